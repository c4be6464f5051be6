//! Typed handles of this node's registered actors: the one place that pairs an actor's
//! registered name with its message type, so a caller cannot send one actor's messages
//! to another's name. Actors restart with new references, so a handle resolves the name
//! at each use.

use std::borrow::Cow;
use std::marker::PhantomData;
use std::time::Duration;

use ractor::{ActorRef, RpcReplyPort};

use crate::catalog::CatalogMsg;
use crate::encoder::ContentEncoderMsg;
use crate::features::UserFeaturesMsg;
use crate::item_stats::ItemStatsMsg;
use crate::names;
use crate::node::CallError;
use crate::ranker::RankerMsg;
use crate::trainer::AlsTrainerMsg;

/// A registered actor of message type `M`.
pub struct ActorHandle<M> {
    name: Cow<'static, str>,
    _msg: PhantomData<fn() -> M>,
}

impl<M: ractor::Message> ActorHandle<M> {
    fn named(name: impl Into<Cow<'static, str>>) -> Self {
        ActorHandle {
            name: name.into(),
            _msg: PhantomData,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The running incarnation, if any.
    pub fn get(&self) -> Option<ActorRef<M>> {
        ractor::registry::where_is(&self.name).map(ActorRef::from)
    }

    /// Sends `msg` when the actor runs (a restarting actor misses it: callers use this
    /// for hints that a later tick repeats).
    pub fn tell(&self, msg: M) {
        if let Some(a) = self.get() {
            // Gone between the lookup and the send: the same as not running.
            drop(a.send_message(msg));
        }
    }

    /// A timed call.
    pub async fn call<T, F>(&self, timeout: Duration, build: F) -> Result<T, CallError>
    where
        T: Send + 'static,
        F: FnOnce(RpcReplyPort<T>) -> M,
    {
        crate::node::call(&self.name, timeout, build).await
    }
}

pub fn ranker() -> ActorHandle<RankerMsg> {
    ActorHandle::named(names::RANKER)
}

pub fn als_trainer() -> ActorHandle<AlsTrainerMsg> {
    ActorHandle::named(names::ALS_TRAINER)
}

pub fn item_stats() -> ActorHandle<ItemStatsMsg> {
    ActorHandle::named(names::ITEM_STATS)
}

pub fn catalog() -> ActorHandle<CatalogMsg> {
    ActorHandle::named(names::CATALOG)
}

pub fn content_encoder() -> ActorHandle<ContentEncoderMsg> {
    ActorHandle::named(names::CONTENT_ENCODER)
}

/// The features actor of partition `p`.
pub fn user_features(p: u32) -> ActorHandle<UserFeaturesMsg> {
    ActorHandle::named(names::user_features(p))
}
