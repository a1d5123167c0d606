//! In-memory per-instance state: files, batches and stored responses, bounded so
//! memory stays flat however long the simulator runs.

use crate::service::{Ctx, Reply, Route};

/// Per-instance stored objects.
#[derive(Default)]
pub(crate) struct Store {}

pub(crate) fn handle(_ctx: &Ctx, _route: Route<'_>) -> Reply {
    Reply::not_found()
}
