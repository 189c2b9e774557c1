//! [`Deadline`]: the point in time a call, or a whole command, must be done by, with the budget
//! it was set from, which is what a timeout error reports.

use std::time::{Duration, Instant};

/// Longest budget honoured: a later deadline cannot be represented on every platform, and
/// nothing waits that long anyway.
const MAX_BUDGET: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A point in time and the budget it was set from.
///
/// The CLI sets one at the start of a command from `--timeout` and holds connecting, its
/// retries and every call to it (see [`crate::ClientOptions::deadline`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    at: Instant,
    budget: Duration,
}

impl Deadline {
    /// The deadline `budget` from now (at most about a century).
    pub fn after(budget: Duration) -> Self {
        let budget = budget.min(MAX_BUDGET);
        let now = Instant::now();
        let at = now.checked_add(budget).unwrap_or(now);
        Self { at, budget }
    }

    /// The point in time.
    pub fn at(&self) -> Instant {
        self.at
    }

    /// The budget it was set from: what a timeout error says it ran out of.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// What is left of it: zero once it has passed.
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Whether it has passed.
    pub fn has_passed(&self) -> bool {
        self.remaining().is_zero()
    }

    /// A deadline set from `budget` that has just passed.
    #[cfg(test)]
    pub(crate) fn passed(budget: Duration) -> Self {
        Self {
            at: Instant::now(),
            budget,
        }
    }

    /// The earlier of this deadline and `other`, when there is one.
    pub(crate) fn min(self, other: Option<Self>) -> Self {
        match other {
            Some(other) if other.at < self.at => other,
            _ => self,
        }
    }

    /// The point in time on tokio's clock, for its timers.
    pub(crate) fn tokio_instant(&self) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earlier_deadline_wins_with_its_budget() {
        let long = Deadline::after(Duration::from_secs(60));
        let short = Deadline::after(Duration::from_secs(1));
        assert_eq!(long.min(Some(short)), short);
        assert_eq!(short.min(Some(long)), short);
        assert_eq!(short.min(None), short);
        assert_eq!(long.min(Some(short)).budget(), Duration::from_secs(1));
    }

    #[test]
    fn what_remains_shrinks_to_zero() {
        let deadline = Deadline::after(Duration::from_secs(60));
        assert!(deadline.remaining() <= Duration::from_secs(60));
        assert!(deadline.remaining() > Duration::from_secs(50));
        assert!(!deadline.has_passed());
        let passed = Deadline::after(Duration::ZERO);
        assert_eq!(passed.remaining(), Duration::ZERO);
        assert!(passed.has_passed());
    }

    #[test]
    fn huge_budgets_are_capped() {
        let deadline = Deadline::after(Duration::MAX);
        assert_eq!(deadline.budget(), MAX_BUDGET);
        assert!(deadline.remaining() > Duration::from_secs(3600));
    }
}
