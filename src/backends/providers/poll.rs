//! The submit-and-poll engine for asynchronous providers (BFL, fal, Replicate): a job is
//! polled with backoff, honouring the provider's `retry-after`, never past the request's
//! deadline; a job still running when the request ends (deadline, client gone, error) is
//! cancelled upstream where the provider has a cancel call. A job in flight costs one timer
//! and a future, not a thread.

use std::future::Future;
use std::time::{Duration, Instant};

use super::super::local::CancelOnDrop;
use super::super::BackendError;

/// How often to poll: `first`, then growing by half up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollPolicy {
    pub first: Duration,
    pub max: Duration,
}

/// What one look at a job found.
pub enum Poll<T> {
    Done(T),
    /// Still running; the provider may say when to look again.
    Pending(Option<Duration>),
}

/// Polls `check` until it is done, fails, or the deadline would pass before the next look
/// (then [`BackendError::Timeout`]). `cancel` is armed throughout and disarmed on success, so
/// every other ending cancels the job.
pub async fn until_done<T, F, Fut>(
    deadline: Instant,
    policy: PollPolicy,
    mut cancel: CancelOnDrop,
    mut check: F,
) -> Result<T, BackendError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Poll<T>, BackendError>>,
{
    // Tokio's clock (the same as the system's outside tests, where time can be paused).
    let end = tokio::time::Instant::now() + deadline.saturating_duration_since(Instant::now());
    let mut delay = policy.first;
    loop {
        let wait = match check().await? {
            Poll::Done(t) => {
                cancel.disarm();
                return Ok(t);
            }
            // A provider's hint is honoured up to four times our own longest wait.
            Poll::Pending(hint) => hint.map_or(delay, |h| h.min(policy.max * 4)),
        };
        if tokio::time::Instant::now() + wait >= end {
            return Err(BackendError::Timeout);
        }
        tokio::time::sleep(wait).await;
        delay = (delay + delay / 2).min(policy.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn backs_off_to_the_max_and_stops_at_the_deadline() {
        let looks = AtomicU32::new(0);
        let policy = PollPolicy {
            first: Duration::from_millis(100),
            max: Duration::from_millis(400),
        };
        let start = Instant::now();
        let got: Result<(), _> = until_done(
            start + Duration::from_secs(3),
            policy,
            CancelOnDrop::new(),
            || async {
                looks.fetch_add(1, Ordering::SeqCst);
                Ok(Poll::Pending(None))
            },
        )
        .await;
        assert!(matches!(got, Err(BackendError::Timeout)));
        // 100, 150, 225, 337, 400, 400, ... ms: about 9 looks in 3 s, not 30.
        let n = looks.load(Ordering::SeqCst);
        assert!((7..=11).contains(&n), "{n} looks");
        let done = until_done(
            start + Duration::from_secs(60),
            policy,
            CancelOnDrop::new(),
            || {
                let n = looks.fetch_add(1, Ordering::SeqCst);
                async move {
                    Ok(if n % 3 == 2 {
                        Poll::Done(n)
                    } else {
                        Poll::Pending(Some(Duration::from_millis(10)))
                    })
                }
            },
        )
        .await
        .unwrap();
        assert_eq!(done % 3, 2);
    }
}
