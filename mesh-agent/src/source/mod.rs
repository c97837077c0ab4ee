//! Where desired state comes from.

pub mod files;
