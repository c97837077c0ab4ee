//! Where desired state comes from.

pub mod files;
pub mod kube;
