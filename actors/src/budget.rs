//! The budget for message bytes in flight: one count, over every
//! connection, of the message data the server holds in memory for sends
//! being read and receives being written. Each connection is bounded on its
//! own (one message of at most `limits.message_bytes`), but thousands of
//! them at once are not: 4,096 sends of 16 MiB would be 64 GiB. A send
//! reserves its bytes as it reads them, before it grows its buffer; past
//! the budget it waits (`timeouts.budget_wait_secs`) and is then answered
//! `unavailable`, having kept nothing.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The server's budget; cheap to clone.
#[derive(Clone)]
pub struct ByteBudget {
    bytes: Arc<Semaphore>,
    total: usize,
    wait: Duration,
}

/// Bytes one exchange holds from the budget, given back when dropped.
pub struct Reservation {
    budget: ByteBudget,
    held: Option<OwnedSemaphorePermit>,
}

/// Why bytes could not be reserved.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BudgetError {
    #[error(
        "the server holds {total} bytes of messages in flight, its limit; \
         none came free within {wait_secs}s"
    )]
    Exhausted { total: usize, wait_secs: u64 },
    #[error("{0} bytes at once is more than the whole budget of message bytes in flight")]
    TooLarge(usize),
}

impl ByteBudget {
    /// A budget of `total` bytes; a reservation waits at most `wait`.
    pub fn new(total: usize, wait: Duration) -> ByteBudget {
        let total = total.min(Semaphore::MAX_PERMITS);
        ByteBudget {
            bytes: Arc::new(Semaphore::new(total)),
            total,
            wait,
        }
    }

    /// An empty reservation, grown as data arrives.
    pub fn reservation(&self) -> Reservation {
        Reservation {
            budget: self.clone(),
            held: None,
        }
    }

    /// Bytes not reserved now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }
}

impl Reservation {
    /// Reserves `bytes` more, waiting for them at most the budget's wait.
    pub async fn grow(&mut self, bytes: usize) -> Result<(), BudgetError> {
        if bytes == 0 {
            return Ok(());
        }
        let budget = &self.budget;
        let held = self.held.as_ref().map_or(0, |p| p.num_permits());
        let asked = u32::try_from(bytes)
            .ok()
            .filter(|_| held.saturating_add(bytes) <= budget.total)
            .ok_or(BudgetError::TooLarge(held.saturating_add(bytes)))?;
        let exhausted = || BudgetError::Exhausted {
            total: budget.total,
            wait_secs: budget.wait.as_secs(),
        };
        let permit =
            tokio::time::timeout(budget.wait, budget.bytes.clone().acquire_many_owned(asked))
                .await
                .map_err(|_| exhausted())?
                .map_err(|_| exhausted())?;
        match &mut self.held {
            Some(held) => held.merge(permit),
            none => *none = Some(permit),
        }
        Ok(())
    }

    /// Bytes held.
    pub fn held(&self) -> usize {
        self.held.as_ref().map_or(0, |p| p.num_permits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_wait_for_bytes_and_give_them_back_when_dropped() {
        let budget = ByteBudget::new(100, Duration::from_millis(50));
        let mut first = budget.reservation();
        first.grow(60).await.unwrap();
        first.grow(30).await.unwrap();
        assert_eq!(first.held(), 90);
        assert_eq!(budget.available(), 10);

        let mut second = budget.reservation();
        second.grow(10).await.unwrap();
        assert!(matches!(
            second.grow(1).await,
            Err(BudgetError::Exhausted { total: 100, .. })
        ));
        assert!(matches!(
            budget.reservation().grow(101).await,
            Err(BudgetError::TooLarge(101))
        ));

        // A waiting reservation gets the bytes another one gives back.
        let waiting = {
            let budget = budget.clone();
            tokio::spawn(async move {
                let mut third = budget.reservation();
                third.grow(50).await.map(|()| third.held())
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(first);
        assert_eq!(waiting.await.unwrap().unwrap(), 50);
        drop(second);
        assert_eq!(budget.available(), 100);
    }
}
