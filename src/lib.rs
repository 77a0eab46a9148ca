//! dealsift: a gRPC service that says whether news text reports a deal.
//!
//! A request flows `service` (gRPC, validation) -> `engine` (tokenize, aggregate) ->
//! `batcher` (queue, dynamic batches) -> `backend` (`cpu` | `neuron`) -> `model`;
//! `telemetry` counts what they do.

pub mod auth;
pub mod backend;
pub mod batcher;
pub mod bench;
pub mod client;
pub mod data;
pub mod engine;
pub mod error;
pub mod eval;
pub mod fnv;
pub mod kserve;
pub mod metrics;
pub mod model;
pub mod proto;
pub mod server;
pub mod service;
pub mod telemetry;
pub mod tokenize;
pub mod train;
