//! kiln-agent: the guest agent's wire protocol, its host-side client, and the agent itself.
