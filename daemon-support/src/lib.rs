//! `daemon-support`: the plumbing both daemons share that is not the protocol (that is
//! `pool-ipc`'s): [`systemd`] (socket activation, sd_notify and the watchdog, the signals a daemon
//! acts on, core tasks whose panic ends the process), [`listeners`] (a socket systemd passed in,
//! or one bound here), [`logging`] (stderr, human or JSON), [`http_server`] (their HTTP
//! listeners, with connection and header-time limits, and each request's peer address),
//! [`exposition`] (the two text formats of `/metrics`), [`trace_export`] (spans to an
//! OpenTelemetry collector, and W3C trace context) and [`errors`] (an error described with its
//! causes).

pub mod errors;
pub mod exposition;
pub mod http_server;
pub mod listeners;
pub mod logging;
pub mod systemd;
pub mod trace_export;
