//! Integration tests: the real gateway on an ephemeral port with a temp data
//! dir, over real HTTP. One test binary (one link) for the whole suite.

mod common;

mod durability;
mod guarantees;
mod ops_api;
mod publish_api;
mod subscribe_api;
mod third_party;
