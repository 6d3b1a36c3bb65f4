//! The Unix-socket side of pool-managerd: [`socket`] creates the socket file safely, [`server`]
//! accepts peers and checks their credentials, [`connection`] speaks the protocol with one peer.

pub mod connection;
pub mod server;
pub mod socket;
