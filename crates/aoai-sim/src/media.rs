//! Images and audio: image generation and edits, transcription and translation
//! (multipart in; JSON, text, SRT or VTT out) and speech (JSON in, audio bytes
//! out). Outputs are deterministic placeholders of the right shape and type.

use std::fmt::Write as _;

use base64::Engine as _;
use bytes::Bytes;
use http::StatusCode;
use http::header::HeaderValue;
use serde::Deserialize;

use crate::azure::{self, FILTER_RESULTS_SAFE};
use crate::multipart;
use crate::openai::{deployment, estimate_tokens, latency};
use crate::service::{Ctx, JSON, Op, Reply, TEXT};

/// A valid 1x1 transparent PNG, returned for `b64_json` images.
const PNG_1X1: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4,
    0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0x00, 0x01, 0x00, 0x00,
    0x05, 0x00, 0x01, 0x0d, 0x0a, 0x2d, 0xb4, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae,
    0x42, 0x60, 0x82,
];

fn content_type(ctx: &Ctx) -> &str {
    ctx.parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[derive(Deserialize, Default)]
struct ImageRequest {
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    response_format: Option<String>,
    #[serde(default)]
    model: Option<String>,
}

pub(crate) fn images(ctx: &Ctx, path_dep: Option<&str>, op: Op) -> Result<Reply, Reply> {
    let ct = content_type(ctx);
    // Edits arrive as multipart forms; generations as JSON.
    let req = if multipart::boundary(ct).is_some() {
        let parts = multipart::parse(ct, &ctx.body)
            .map_err(|e| Reply::bad_request(&e.to_string(), None, None))?;
        ImageRequest {
            prompt: multipart::text(&parts, "prompt").map(str::to_owned),
            n: multipart::text(&parts, "n").and_then(|n| n.parse().ok()),
            response_format: multipart::text(&parts, "response_format").map(str::to_owned),
            model: multipart::text(&parts, "model").map(str::to_owned),
        }
    } else {
        ctx.json::<ImageRequest>()?
    };
    let dep = deployment(path_dep, req.model.as_deref())?;
    let Some(prompt) = req.prompt.as_deref().filter(|p| !p.is_empty()) else {
        return Err(
            Reply::bad_request("'prompt' is a required property", Some("prompt"), None)
                .with_deployment(dep),
        );
    };
    let remaining = ctx.admit(dep, op, estimate_tokens(prompt))?;
    ctx.filter(prompt).map_err(|e| e.with_deployment(dep))?;
    let n = req.n.unwrap_or(1).clamp(1, 10);
    let b64 = req.response_format.as_deref() == Some("b64_json");
    let revised = serde_json::to_string(prompt).unwrap_or_else(|_| "\"\"".to_owned());
    let mut s = format!(r#"{{"created":{},"data":["#, azure::unix_now());
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(
            s,
            r#"{{"content_filter_results":{FILTER_RESULTS_SAFE},"prompt_filter_results":{FILTER_RESULTS_SAFE},"revised_prompt":{revised},"#
        );
        if b64 {
            let _ = write!(
                s,
                r#""b64_json":"{}"}}"#,
                base64::engine::general_purpose::STANDARD.encode(PNG_1X1)
            );
        } else {
            let _ = write!(
                s,
                r#""url":"https://sim.invalid/images/{}.png"}}"#,
                azure::object_id("img-")
            );
        }
    }
    s.push_str("]}");
    let mut r = Reply::ok_json(s);
    r.delay = ctx.delay(Some(dep), latency(ctx, dep).0);
    r.remaining = Some(remaining);
    Ok(r.with_deployment(dep))
}

fn timestamp(secs: f64, sep: char) -> String {
    let ms = (secs * 1000.0).round() as u64;
    format!(
        "{:02}:{:02}:{:02}{sep}{:03}",
        ms / 3_600_000,
        (ms / 60_000) % 60,
        (ms / 1000) % 60,
        ms % 1000
    )
}

pub(crate) fn transcribe(ctx: &Ctx, path_dep: Option<&str>, op: Op) -> Result<Reply, Reply> {
    let parts = multipart::parse(content_type(ctx), &ctx.body).map_err(|e| {
        Reply::bad_request(
            &format!("Invalid form: {e}."),
            None,
            Some("invalid_request"),
        )
    })?;
    let dep = deployment(path_dep, multipart::text(&parts, "model"))?;
    let Some(file) = multipart::field(&parts, "file") else {
        return Err(
            Reply::bad_request("'file' is a required property", Some("file"), None)
                .with_deployment(dep),
        );
    };
    let remaining = ctx.admit(dep, op, 1)?;
    let task = if op == Op::Translations {
        "translate"
    } else {
        "transcribe"
    };
    let text = format!(
        "Simulated {} of {} bytes of audio.",
        if op == Op::Translations {
            "translation"
        } else {
            "transcription"
        },
        file.data.len()
    );
    // A nominal 1 s of audio per 16 kB, at least 1 s.
    let duration = (file.data.len() as f64 / 16_000.0).max(1.0);
    let format = multipart::text(&parts, "response_format").unwrap_or("json");
    let mut r = match format {
        "text" => Reply::new(StatusCode::OK, TEXT, format!("{text}\n")),
        "srt" => Reply::new(
            StatusCode::OK,
            TEXT,
            format!(
                "1\n{} --> {}\n{text}\n\n",
                timestamp(0.0, ','),
                timestamp(duration, ',')
            ),
        ),
        "vtt" => Reply::new(
            StatusCode::OK,
            HeaderValue::from_static("text/vtt; charset=utf-8"),
            format!(
                "WEBVTT\n\n{} --> {}\n{text}\n\n",
                timestamp(0.0, '.'),
                timestamp(duration, '.')
            ),
        ),
        "verbose_json" => Reply::new(
            StatusCode::OK,
            JSON,
            serde_json::json!({
                "task": task,
                "language": multipart::text(&parts, "language").unwrap_or("english"),
                "duration": duration,
                "text": text,
                "segments": [{
                    "id": 0, "seek": 0, "start": 0.0, "end": duration, "text": text,
                    "tokens": [], "temperature": 0.0, "avg_logprob": -0.1,
                    "compression_ratio": 1.0, "no_speech_prob": 0.0
                }]
            })
            .to_string(),
        ),
        "json" => Reply::new(
            StatusCode::OK,
            JSON,
            serde_json::json!({ "text": text }).to_string(),
        ),
        other => {
            return Err(Reply::bad_request(
                &format!("Invalid value for 'response_format': {other}. Supported values are: 'json', 'text', 'srt', 'verbose_json', and 'vtt'."),
                Some("response_format"),
                Some("invalid_value"),
            )
            .with_deployment(dep));
        }
    };
    r.delay = ctx.delay(Some(dep), latency(ctx, dep).0);
    r.remaining = Some(remaining);
    Ok(r.with_deployment(dep))
}

#[derive(Deserialize)]
struct SpeechRequest {
    #[serde(default)]
    input: Option<String>,
    #[serde(default)]
    response_format: Option<String>,
    #[serde(default)]
    model: Option<String>,
}

/// Deterministic audio bytes: a real WAV header (16 kHz mono PCM) followed by
/// silence for WAV, a frame-header-led buffer for the compressed formats.
fn audio_bytes(format: &str, input: &str) -> Vec<u8> {
    // A nominal 1/15 s of audio per input character, capped at 60 s.
    let samples = (input.chars().count() * 16_000 / 15).clamp(1_600, 960_000);
    match format {
        "wav" | "pcm" => {
            let data_len = u32::try_from(samples * 2).unwrap_or(u32::MAX);
            let mut v = Vec::with_capacity(samples * 2 + 44);
            if format == "wav" {
                v.extend_from_slice(b"RIFF");
                v.extend_from_slice(&(36 + data_len).to_le_bytes());
                v.extend_from_slice(b"WAVEfmt ");
                v.extend_from_slice(&16u32.to_le_bytes());
                v.extend_from_slice(&1u16.to_le_bytes()); // PCM
                v.extend_from_slice(&1u16.to_le_bytes()); // mono
                v.extend_from_slice(&16_000u32.to_le_bytes());
                v.extend_from_slice(&32_000u32.to_le_bytes());
                v.extend_from_slice(&2u16.to_le_bytes());
                v.extend_from_slice(&16u16.to_le_bytes());
                v.extend_from_slice(b"data");
                v.extend_from_slice(&data_len.to_le_bytes());
            }
            v.resize(v.len() + samples * 2, 0);
            v
        }
        _ => {
            let mut v = Vec::with_capacity(samples / 4 + 4);
            let header: &[u8] = match format {
                "opus" => b"OggS",
                "flac" => b"fLaC",
                "aac" => &[0xff, 0xf1, 0x50, 0x80],
                _ => &[0xff, 0xfb, 0x90, 0x64],
            };
            v.extend_from_slice(header);
            v.resize(samples / 4 + header.len(), 0);
            v
        }
    }
}

pub(crate) fn speech(ctx: &Ctx, path_dep: Option<&str>) -> Result<Reply, Reply> {
    let req: SpeechRequest = ctx.json()?;
    let dep = deployment(path_dep, req.model.as_deref())?;
    let Some(input) = req.input.as_deref().filter(|i| !i.is_empty()) else {
        return Err(
            Reply::bad_request("'input' is a required property", Some("input"), None)
                .with_deployment(dep),
        );
    };
    let remaining = ctx.admit(dep, Op::Speech, estimate_tokens(input))?;
    let format = req.response_format.as_deref().unwrap_or("mp3");
    let ct = match format {
        "mp3" => "audio/mpeg",
        "opus" => "audio/ogg",
        "aac" => "audio/aac",
        "flac" => "audio/flac",
        "wav" => "audio/wav",
        "pcm" => "audio/pcm",
        other => {
            return Err(Reply::bad_request(
                &format!("Invalid value for 'response_format': {other}."),
                Some("response_format"),
                Some("invalid_value"),
            )
            .with_deployment(dep));
        }
    };
    let mut r = Reply::new(
        StatusCode::OK,
        HeaderValue::from_static(ct),
        Bytes::from(audio_bytes(format, input)),
    );
    r.delay = ctx.delay(Some(dep), latency(ctx, dep).0);
    r.remaining = Some(remaining);
    Ok(r.with_deployment(dep))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wav_output_has_a_consistent_riff_header() {
        let v = audio_bytes("wav", "hello world");
        assert_eq!(&v[..4], b"RIFF");
        let riff_len = u32::from_le_bytes(v[4..8].try_into().unwrap()) as usize;
        assert_eq!(riff_len + 8, v.len());
    }

    #[test]
    fn subtitle_timestamps_use_the_right_separator() {
        assert_eq!(timestamp(61.5, ','), "00:01:01,500");
        assert_eq!(timestamp(0.0, '.'), "00:00:00.000");
    }
}
