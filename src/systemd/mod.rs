//! Running under systemd on a VM, without libsystemd: the two protocols are small enough to
//! speak directly.
//!
//! - [`notify`]: `Type=notify` — `READY=1` once spillway serves, `RELOADING=1` … `READY=1`
//!   around a reload, `STOPPING=1` when the drain begins, sent as datagrams to
//!   `$NOTIFY_SOCKET`.
//! - [`sockets`]: socket activation — listening sockets passed in by systemd (`LISTEN_FDS`,
//!   `LISTEN_PID`, `LISTEN_FDNAMES`) are served instead of binding. systemd keeps them open
//!   while spillway restarts, so new connections wait in the kernel's backlog instead of being
//!   refused.
//!
//! Both do nothing when their variables are not set, so the same binary runs anywhere.

pub(crate) mod notify;
pub(crate) mod sockets;
