//! Integration tests against real PostgreSQL 15 and 18 servers and a real S3 API server.
//!
//! Run them with `scripts/test`, which installs PostgreSQL 15 and 18 and starts an S3 server on
//! loopback. Run alone (`cargo test --test integration`) they use whatever is installed and skip
//! the rest, except under `CI=true`, where anything missing is a failure.

mod archive;
mod backup;
mod blocks;
mod docs;
mod encryption;
mod harness;
mod incremental;
mod operations;
mod receive;
mod reliability;
mod repos;
mod restore;
mod scale;
mod stream;
mod trust;
mod walindex;
