//! End-to-end tests: the command service, the projector and the `handoff` binary against a
//! real nats-server per test (ephemeral port, temporary store, `sync_interval: always`).

mod alerts;
mod answers;
mod audit;
mod bad_input;
mod cancel;
mod cli;
mod cluster;
mod command_model;
mod concurrency;
mod console;
mod dataplane;
mod drain;
mod examples;
mod fleet_ops;
mod heartbeats;
mod idempotency;
mod lost;
mod metrics;
mod monitor;
mod moves;
mod outages;
mod permissions;
mod projector;
mod reports;
mod restart;
mod scale;
mod security;
mod startup;
mod web;
