//! Helpers shared by the black-box tests. Each test file uses a different subset.
#![allow(dead_code)]

pub mod netns;
