#![no_std]
//! The kernel programs live in the `tracer` binary target (src/main.rs); this empty library
//! lets `tracer` name the crate as a build dependency so cargo rebuilds it on changes.
