//! The `troupe` binary. Everything lives in the library modules; this only dispatches.

use std::process::ExitCode;

fn main() -> ExitCode {
    troupe_node::run()
}
