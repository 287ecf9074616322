//! The Arcade Mesh agent: registration, job execution with plugin stages, the verified
//! plugin cache and resumable downloads. Its code arrives with the agent issue; the crate
//! exists now so the workspace tree matches the architecture in `DESIGN.md`.
#![forbid(unsafe_code)]
