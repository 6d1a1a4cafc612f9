//! Writing HTTP/1.1 messages: field lines, status lines and chunk framing, shared by the
//! downstream server (responses) and the upstream client (requests).

use http::{HeaderMap, StatusCode};

/// Writes one `name: value` field line.
pub(crate) fn field(buf: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    buf.extend_from_slice(name);
    buf.extend_from_slice(b": ");
    buf.extend_from_slice(value);
    buf.extend_from_slice(b"\r\n");
}

/// Writes header (or trailer) fields, one `name: value` line each.
pub(crate) fn fields(buf: &mut Vec<u8>, map: &HeaderMap) {
    for (name, value) in map {
        field(buf, name.as_str().as_bytes(), value.as_bytes());
    }
}

/// Writes `HTTP/1.1 <code> <reason>`. The reason phrase is the standard one (clients must
/// ignore it, RFC 9112 §4); an unknown code gets none.
pub(crate) fn status_line(buf: &mut Vec<u8>, status: StatusCode) {
    buf.extend_from_slice(b"HTTP/1.1 ");
    buf.extend_from_slice(status.as_str().as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    buf.extend_from_slice(b"\r\n");
}

/// Writes a chunk-size line: the size in hex, then CRLF.
pub(crate) fn chunk_size(buf: &mut Vec<u8>, len: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = len;
    loop {
        i -= 1;
        digits[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
    buf.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_written_as_the_wire_wants_them() {
        let mut buf = Vec::new();
        status_line(&mut buf, StatusCode::SERVICE_UNAVAILABLE);
        field(&mut buf, b"retry-after", b"5");
        for n in [0, 1, 15, 16, 255, 0x1234_abcd] {
            chunk_size(&mut buf, n);
        }
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "HTTP/1.1 503 Service Unavailable\r\nretry-after: 5\r\n0\r\n1\r\nf\r\n10\r\nff\r\n1234abcd\r\n"
        );
        let mut buf = Vec::new();
        status_line(&mut buf, StatusCode::from_u16(599).unwrap());
        assert_eq!(buf, b"HTTP/1.1 599 \r\n");
    }
}
