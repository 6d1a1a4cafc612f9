//! HTTP/1.1 on the wire, in both directions: the message rules the downstream [`server`] and
//! the upstream client (`proxy::upstream::http1`) share ([`decode`], [`encode`],
//! [`request`]), and the server itself.

pub(crate) mod date;
pub(crate) mod decode;
pub(crate) mod encode;
pub(crate) mod request;
pub(crate) mod server;
