//! The `Date` field of the responses spillway writes (RFC 9110 §6.6.1), formatted once a
//! second per thread rather than once per response.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

/// `Sun, 06 Nov 1994 08:49:37 GMT`: always 29 bytes.
const LEN: usize = 29;

thread_local! {
    static CACHED: RefCell<(u64, [u8; LEN])> = const { RefCell::new((u64::MAX, [0; LEN])) };
}

/// Appends the current HTTP-date to `buf`.
pub(crate) fn append_now(buf: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            let text = httpdate::fmt_http_date(now);
            if text.len() == LEN {
                c.1.copy_from_slice(text.as_bytes());
                c.0 = secs;
            } else {
                buf.extend_from_slice(text.as_bytes());
                return;
            }
        }
        buf.extend_from_slice(&c.1);
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_date_is_an_http_date() {
        let mut buf = Vec::new();
        super::append_now(&mut buf);
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(text.len(), super::LEN);
        assert!(text.ends_with(" GMT"), "{text}");
        assert!(httpdate::parse_http_date(&text).is_ok(), "{text}");
    }
}
