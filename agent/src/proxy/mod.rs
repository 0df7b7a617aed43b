//! The shared proxy: what happens to a connection once the kernel handed it
//! to one of the agent's listeners.

pub mod inbound_plain;
pub mod outbound;
pub mod relay;
