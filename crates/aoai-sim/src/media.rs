//! Images and audio: image generation, transcription and translation (multipart
//! in, JSON or text out) and speech (JSON in, audio bytes out).

use crate::service::{Ctx, Op, Reply};

pub(crate) fn images(_ctx: &Ctx, _dep: Option<&str>, _op: Op) -> Result<Reply, Reply> {
    Err(Reply::not_found())
}

pub(crate) fn transcribe(_ctx: &Ctx, _dep: Option<&str>, _op: Op) -> Result<Reply, Reply> {
    Err(Reply::not_found())
}

pub(crate) fn speech(_ctx: &Ctx, _dep: Option<&str>) -> Result<Reply, Reply> {
    Err(Reply::not_found())
}
