//! The admin bearer token (`admin.token_file`): read at start and on every reload, and checked
//! on the full admin endpoint's control paths (`/`, `/status.json`, `/config`, `/reload`).
//!
//! A request is let through with `Authorization: Bearer <token>` (scripts, `curl`), or with
//! HTTP Basic whose password is the token (any user name): a browser asks for that itself when
//! the answer is `401` with a `Basic` challenge, and then sends it with the status page's own
//! requests too. The comparison takes the same time wherever the first difference is.

use std::path::Path;

use http::HeaderValue;

use crate::config::{ConfigError, ConfigErrors, Settings};

/// The config key the token comes from, where its errors are reported.
const KEY: &str = "admin.token_file";

/// A token read from its file.
pub(crate) struct AdminToken(Box<[u8]>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never printed, not even by accident in a debug log.
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    /// The token in `text` (a file's content): surrounding whitespace (the newline an editor or
    /// `echo` adds) is not part of it; it must not be empty, nor contain spaces or control
    /// characters (it travels in a header).
    fn parse(text: &str) -> Result<AdminToken, String> {
        let token = text.trim();
        if token.is_empty() {
            return Err("the token file is empty".to_owned());
        }
        if token.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(
                "the token must be visible ASCII without spaces (it is sent in a header)"
                    .to_owned(),
            );
        }
        Ok(AdminToken(token.as_bytes().into()))
    }

    /// Reads the token file at `path`.
    fn read(path: &Path) -> Result<AdminToken, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
        AdminToken::parse(&text).map_err(|e| format!("{e} ({})", path.display()))
    }

    /// Whether an `Authorization` value carries this token.
    pub(crate) fn accepts(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some(value) = authorization.map(HeaderValue::as_bytes) else {
            return false;
        };
        let Some(space) = value.iter().position(|&b| b == b' ') else {
            return false;
        };
        let (scheme, credentials) = (&value[..space], value[space + 1..].trim_ascii());
        if scheme.eq_ignore_ascii_case(b"bearer") {
            return same(credentials, &self.0);
        }
        if scheme.eq_ignore_ascii_case(b"basic") {
            let Some(decoded) = base64_decode(credentials) else {
                return false;
            };
            // `user:password`; the user name is not checked.
            return match decoded.iter().position(|&b| b == b':') {
                Some(colon) => same(&decoded[colon + 1..], &self.0),
                None => false,
            };
        }
        false
    }
}

/// The token `settings` name, read from its file (`None` without `admin.token_file`). A file
/// that cannot be read, or holds no usable token, is a config error at `admin.token_file`.
pub(crate) fn load(settings: &Settings) -> Result<Option<AdminToken>, ConfigErrors> {
    match &settings.admin_token_file {
        None => Ok(None),
        Some(path) => AdminToken::read(path)
            .map(Some)
            .map_err(|message| ConfigErrors(vec![ConfigError::new(KEY, message)])),
    }
}

/// Equal bytes, compared without an early exit (only the lengths may show).
fn same(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() {
        return false;
    }
    given
        .iter()
        .zip(expected)
        .fold(0u8, |diff, (a, b)| diff | (a ^ b))
        == 0
}

/// Standard base64 (RFC 4648, with or without padding); `None` for anything else.
fn base64_decode(text: &[u8]) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let text = match text.iter().position(|&c| c == b'=') {
        Some(pad) if text[pad..].iter().all(|&c| c == b'=') && text.len() % 4 == 0 => &text[..pad],
        Some(_) => return None,
        None => text,
    };
    if text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(text: &str) -> AdminToken {
        AdminToken::parse(text).unwrap()
    }

    fn header(v: &str) -> Option<HeaderValue> {
        Some(HeaderValue::from_str(v).unwrap())
    }

    #[test]
    fn bearer_and_basic_with_the_token_as_password_are_accepted() {
        let t = token("s3cr3t-Token\n");
        assert!(t.accepts(header("Bearer s3cr3t-Token").as_ref()));
        assert!(t.accepts(header("bearer  s3cr3t-Token").as_ref()));
        // `ops:s3cr3t-Token` and `:s3cr3t-Token`.
        assert!(t.accepts(header("Basic b3BzOnMzY3IzdC1Ub2tlbg==").as_ref()));
        assert!(t.accepts(header("Basic OnMzY3IzdC1Ub2tlbg==").as_ref()));
        for wrong in [
            "Bearer s3cr3t-token",
            "Bearer s3cr3t-Token2",
            "Bearer ",
            "s3cr3t-Token",
            "Token s3cr3t-Token",
            // `s3cr3t-Token` as the user name, no password.
            "Basic czNjcjN0LVRva2VuOg==",
            "Basic not*base64",
        ] {
            assert!(!t.accepts(header(wrong).as_ref()), "{wrong}");
        }
        assert!(!t.accepts(None));
    }

    #[test]
    fn a_token_must_be_there_and_fit_in_a_header() {
        assert!(AdminToken::parse(" \n").is_err());
        assert!(AdminToken::parse("two words").is_err());
        assert_eq!(&*token("  abc  \n").0, b"abc");
        assert_eq!(format!("{:?}", token("abc")), "AdminToken(..)");
    }

    #[test]
    fn base64_decodes_padded_and_unpadded_text() {
        assert_eq!(base64_decode(b"b3BzOnB3").unwrap(), b"ops:pw");
        assert_eq!(base64_decode(b"b3BzOnB").unwrap(), b"ops:p");
        assert_eq!(base64_decode(b"b3BzOnA=").unwrap(), b"ops:p");
        assert_eq!(base64_decode(b"YQ==").unwrap(), b"a");
        assert_eq!(base64_decode(b"").unwrap(), b"");
        assert!(base64_decode(b"Y").is_none());
        assert!(base64_decode(b"YQ=x").is_none());
        assert!(base64_decode(b"Y!==").is_none());
    }

    #[test]
    fn a_missing_file_is_an_error_at_the_key() {
        let mut settings = crate::config::load_str(
            "listeners: [{ address: 127.0.0.1:0 }]\nupstreams: { app: { endpoints: [\"127.0.0.1:1\"] } }\nroutes: [{ name: r, upstream: app }]\n",
        )
        .unwrap()
        .settings;
        assert!(load(&settings).unwrap().is_none());
        settings.admin_token_file = Some("/nonexistent/spillway-token".into());
        let e = load(&settings).unwrap_err();
        assert_eq!(e.0[0].path, "admin.token_file");
        assert!(e.0[0]
            .message
            .contains("cannot read the token file /nonexistent/spillway-token"));
    }
}
