//! `troupe-actors`: the supervised actors that run Troupe's models online (journal,
//! feature store, model branches, ranker), their messages, and cluster routing.
//!
//! This crate is deliberately empty until the actor pipeline lands: the algorithms it will
//! run live in `troupe-models`, which this crate depends on, and nothing here may be used
//! by `troupe-models` (see ARCHITECTURE.md, "Layering").

pub use troupe_models as models;
