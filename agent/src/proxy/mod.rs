//! The shared proxy: what happens to a connection once the kernel handed it
//! to one of the agent's listeners.

pub mod dial;
pub mod inbound_plain;
pub mod inbound_tunnel;
pub mod outbound;
pub mod relay;
