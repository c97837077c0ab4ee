//! Where desired state comes from.

pub mod cluster_identity;
pub mod files;
pub mod kube;
