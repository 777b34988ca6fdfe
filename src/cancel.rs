//! Cancellation, one mechanism for everything that stops work early: a lost claim, a time
//! limit, a worker or scheduler shutting down, a revoke.
//!
//! The token is tokio-util's `CancellationToken`: async code awaits `cancelled()`, and the
//! blocking jobs of the CPU pool poll `is_cancelled()` at least once per chunk or member
//! through [`check`], so a cancelled job stops within a fraction of a second, cleans up its
//! temporary files and returns [`Cancelled`].

use std::io;

pub use tokio_util::sync::CancellationToken;

/// Work stopped because its token was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the work was cancelled")]
pub struct Cancelled;

impl From<Cancelled> for io::Error {
    fn from(cancelled: Cancelled) -> io::Error {
        io::Error::other(cancelled)
    }
}

/// `Err` (an `io::Error` wrapping [`Cancelled`]) once `cancel` is cancelled. Blocking loops
/// call it per chunk, entry or member.
pub fn check(cancel: &CancellationToken) -> io::Result<()> {
    if cancel.is_cancelled() {
        Err(Cancelled.into())
    } else {
        Ok(())
    }
}

/// Whether an I/O error is the one [`check`] returns.
pub fn is_cancelled(err: &io::Error) -> bool {
    err.get_ref().is_some_and(|inner| inner.is::<Cancelled>())
}

/// Whether any error in the chain of `err` is a cancellation.
pub fn in_chain(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause.is::<Cancelled>() || cause.downcast_ref::<io::Error>().is_some_and(is_cancelled)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_fails_once_cancelled_and_the_error_is_recognised() {
        let token = CancellationToken::new();
        assert!(check(&token).is_ok());
        token.cancel();
        let err = check(&token).unwrap_err();
        assert!(is_cancelled(&err));
        assert!(!is_cancelled(&io::Error::other("disk full")));
        let chained = anyhow::Error::new(err).context("cannot bundle `x`");
        assert!(in_chain(&chained));
        assert!(!in_chain(&anyhow::format_err!("other")));
    }
}
