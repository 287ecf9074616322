//! arcadectl (filled next)
