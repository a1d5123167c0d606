//! A small `multipart/form-data` reader (RFC 7578), enough for the audio and file
//! upload routes: it splits the body on the boundary and reads each part's
//! `Content-Disposition` name and filename. Parts borrow from the request body.

/// One form field or file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Part<'a> {
    pub(crate) name: String,
    pub(crate) filename: Option<String>,
    pub(crate) data: &'a [u8],
}

/// Why a body is not a readable multipart form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MultipartError {
    #[error("the content-type is not multipart/form-data with a boundary")]
    NoBoundary,
    #[error("the multipart body is malformed")]
    Malformed,
}

/// The boundary parameter of a `multipart/form-data` content type.
pub(crate) fn boundary(content_type: &str) -> Option<&str> {
    let mut it = content_type.split(';');
    let mime = it.next()?.trim();
    if !mime.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    it.find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"'))
    })
    .filter(|b| !b.is_empty())
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let last = hay.len() - needle.len();
    let mut i = from;
    while i <= last {
        if hay[i] == first && &hay[i..i + needle.len()] == needle {
            return Some(i);
        }
        i += 1;
    }
    None
}

fn disposition_param(line: &str, key: &str) -> Option<String> {
    line.split(';').find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case(key)
            .then(|| v.trim().trim_matches('"').to_owned())
    })
}

/// Split `body` into parts.
pub(crate) fn parse<'a>(
    content_type: &str,
    body: &'a [u8],
) -> Result<Vec<Part<'a>>, MultipartError> {
    let b = boundary(content_type).ok_or(MultipartError::NoBoundary)?;
    let delim = format!("--{b}");
    let next_delim = format!("\r\n--{b}");
    let mut pos = find(body, delim.as_bytes(), 0).ok_or(MultipartError::Malformed)? + delim.len();
    let mut parts = Vec::new();
    loop {
        // After a delimiter: "--" ends the form, CRLF starts a part.
        if body[pos..].starts_with(b"--") {
            return Ok(parts);
        }
        if !body[pos..].starts_with(b"\r\n") {
            return Err(MultipartError::Malformed);
        }
        pos += 2;
        let head_end = find(body, b"\r\n\r\n", pos).ok_or(MultipartError::Malformed)?;
        let head =
            std::str::from_utf8(&body[pos..head_end]).map_err(|_| MultipartError::Malformed)?;
        let mut name = None;
        let mut filename = None;
        for line in head.split("\r\n") {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            if k.trim().eq_ignore_ascii_case("content-disposition") {
                name = disposition_param(v, "name");
                filename = disposition_param(v, "filename");
            }
        }
        let data_start = head_end + 4;
        let end = find(body, next_delim.as_bytes(), data_start).ok_or(MultipartError::Malformed)?;
        parts.push(Part {
            name: name.ok_or(MultipartError::Malformed)?,
            filename,
            data: &body[data_start..end],
        });
        pos = end + next_delim.len();
    }
}

/// The first part named `name`.
pub(crate) fn field<'p, 'a>(parts: &'p [Part<'a>], name: &str) -> Option<&'p Part<'a>> {
    parts.iter().find(|p| p.name == name)
}

/// The text of the first part named `name`.
pub(crate) fn text<'a>(parts: &[Part<'a>], name: &str) -> Option<&'a str> {
    field(parts, name).and_then(|p| std::str::from_utf8(p.data).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_and_files() {
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\r\n--data\r\n--XyZ--\r\n";
        let parts = parse("multipart/form-data; boundary=XyZ", body).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(text(&parts, "model"), Some("whisper"));
        let f = field(&parts, "file").unwrap();
        assert_eq!(f.filename.as_deref(), Some("a.wav"));
        assert_eq!(f.data, b"RIFF\r\n--data");
    }

    #[test]
    fn rejects_missing_boundary_and_truncated_bodies() {
        assert_eq!(
            parse("application/json", b"").unwrap_err(),
            MultipartError::NoBoundary
        );
        assert_eq!(
            parse(
                "multipart/form-data; boundary=b",
                b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nunterminated"
            )
            .unwrap_err(),
            MultipartError::Malformed
        );
        assert_eq!(
            boundary("multipart/form-data; boundary=\"q q\""),
            Some("q q")
        );
    }

    proptest::proptest! {
        /// Any field contents survive a round trip, CRLFs and dashes included.
        #[test]
        fn parts_round_trip(fields in proptest::collection::vec(
            ("[a-z]{1,8}", proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)), 1..5)
        ) {
            let boundary = "b0undary-7f3a";
            let mut body = Vec::new();
            for (name, data) in &fields {
                body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes());
                body.extend_from_slice(data);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
            let parsed = parse(&format!("multipart/form-data; boundary={boundary}"), &body).unwrap();
            proptest::prop_assert_eq!(parsed.len(), fields.len());
            for (p, (name, data)) in parsed.iter().zip(&fields) {
                proptest::prop_assert_eq!(&p.name, name);
                proptest::prop_assert_eq!(p.data, &data[..]);
            }
        }
    }
}
