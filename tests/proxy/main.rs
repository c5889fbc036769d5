//! Integration tests: redcloak in front of a real redis-server (TLS only,
//! client certificates, ACL user), driven by real clients: the `redis`
//! crate, raw RESP over sockets, redis-cli and redis-benchmark.

mod audit;
mod auth;
mod bad_input;
mod binary;
mod clients;
mod cluster;
mod commands;
mod encryption;
mod frameworks;
mod gate;
mod grammar;
mod kms;
mod lanes;
mod listeners;
mod lists;
mod observability;
mod packaging;
mod pool;
mod process;
mod pubsub;
mod rekey;
mod reload;
mod scripts;
mod sentinel;
mod sets;
mod streams;
mod support;
mod transactions;
mod upstream;
