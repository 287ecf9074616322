//! Arcade Mesh simulations: the one-command demo, the real-stack swarm run and the
//! fleet-scale model. Its code arrives with the simulations issue; the crate exists now so
//! the workspace tree matches the architecture in `DESIGN.md`.
#![forbid(unsafe_code)]
