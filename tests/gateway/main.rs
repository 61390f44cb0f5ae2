//! Integration tests: the real gateway on an ephemeral port with a temp data
//! dir, over real HTTP. One test binary (one link) for the whole suite.

mod common;

mod auth;
mod browser;
mod browser_h2;
mod cli;
mod connections;
mod damage;
mod durability;
mod guarantees;
mod idempotency;
mod limits;
mod loadgen;
mod memory;
mod ops_api;
mod power_loss;
mod props;
mod publish_api;
mod readme;
mod redis;
mod redis_cluster_failover;
mod redis_power_loss;
mod redis_readiness;
mod redis_sentinel;
mod redis_shards;
mod subscribe_api;
mod third_party;
mod tls;
mod transfer;
