//! The mesh link between Weir clusters: what a gateway exports and imports, how packets travel
//! between gateways, and what a peer with a valid certificate is still not allowed to do.
//!
//! - [`sync`]: the versioned export/import protocol as pure state machines (resume after a
//!   reconnect, full resync ended by a "synced" marker, nothing deleted before it).
//! - [`export`]: the synced entries (identities, endpoints) and their wire form.
//! - [`export_feed`]: the sending half of a session that follows an exporter.
//! - [`confine`]: the checks that confine a peer, and refusal counters by reason.
//! - [`codec`]: the records of a packet batch.
//! - [`lanes`]: which lane a packet takes (flows hashed onto bulk lanes; a latency lane).
//! - [`fanout`]: a gateway's merged import, served to the other nodes of its cluster.

pub mod certs;
pub mod codec;
pub mod confine;
pub mod export;
pub mod export_feed;
pub mod fanout;
pub mod lanes;
pub mod link;
pub mod sync;
pub mod tls;
pub mod transport;
