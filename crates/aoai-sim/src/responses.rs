//! The Responses API: create (deployment from the body `model`), stored so that
//! retrieve and `previous_response_id` work.

use crate::service::{Ctx, Reply};

pub(crate) fn create(_ctx: &Ctx) -> Result<Reply, Reply> {
    Err(Reply::not_found())
}
