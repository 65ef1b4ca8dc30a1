//! The admin commands run directly on a PostgreSQL database, with no node
//! at hand (`csm admin --store-url URL …` when no admin socket answers):
//! the same dispatch the admin socket uses, on a store opened in this
//! process. Changes reach the running nodes through the database's hints,
//! so a user added here is announced by every node.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use csm_actors::auth::{AuthSettings, Authenticator};
use csm_actors::cluster::{self, PgDirectory, PgMail, PgSettings};
use csm_actors::mailbox::MailboxSettings;
use csm_actors::mailbox_handle::MailboxHandle;
use csm_actors::presence::PresenceActor;
use csm_actors::services::{Backing, Services};
use csm_actors::settings::{Limits, Timeouts};
use csm_actors::shared_mailbox::SharedMailboxActor;
use csm_actors::store::Directory;

use super::protocol::{Failure, Outcome, Request};

/// Runs `request` on the database at `url`, on an actix system of its own
/// (on a thread of its own, so that it may be called from inside another
/// runtime too).
pub fn execute(url: &str, data_dir: &Path, request: Request) -> Outcome {
    std::thread::scope(|scope| {
        scope
            .spawn(|| actix::System::new().block_on(run(url, data_dir, request)))
            .join()
            .unwrap_or_else(|_| Err(Failure::internal("the admin thread panicked")))
    })
}

async fn run(url: &str, data_dir: &Path, request: Request) -> Outcome {
    {
        let settings = PgSettings {
            url: url.to_owned(),
            node: "csm-admin".to_owned(),
            pool_size: 2,
            lease: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
        };
        let pool = cluster::open_pool(&settings)
            .await
            .map_err(Failure::internal)?;
        let users: Arc<dyn Directory> = Arc::new(PgDirectory::new(pool.clone()));
        let auth = Arc::new(
            Authenticator::new(
                users.clone(),
                AuthSettings {
                    parallel_hashes: 1,
                    ..AuthSettings::default()
                },
            )
            .map_err(Failure::internal)?,
        );
        let mail = PgMail::start(
            pool.clone(),
            settings.node.clone(),
            MailboxSettings::default(),
            1,
            16,
        );
        let mailbox = SharedMailboxActor::new(mail).start();
        let services = Services::new(
            Limits::default(),
            Timeouts::default(),
            Backing {
                users,
                auth,
                presence: PresenceActor::new(Vec::<String>::new()).start(),
                mailbox: MailboxHandle::of(&mailbox),
                stager: None,
                shared_db: Some(pool),
            },
        );
        super::socket::execute(request, &services, data_dir).await
    }
}
