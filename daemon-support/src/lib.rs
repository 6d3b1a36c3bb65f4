//! `daemon-support`: the plumbing both daemons share that is not the protocol (that is
//! `pool-ipc`'s): [`systemd`] (socket activation, sd_notify and the watchdog, the signals a daemon
//! acts on, core tasks whose panic ends the process), [`listeners`] (a socket systemd passed in,
//! or one bound here), [`http_server`] (their HTTP listeners, with connection and header-time
//! limits) and [`errors`] (an error described with its causes).

pub mod errors;
pub mod http_server;
pub mod listeners;
pub mod systemd;
