//! Connections: the pool, the session settings every connection starts
//! with, and running statements prepared once per connection.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, StatementCache};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use crate::error::{Error, Result};

/// How long a session may sit idle inside a transaction before the server
/// ends it: the store never holds one open while a stage runs.
const IDLE_IN_TRANSACTION: &str = "30s";

/// How long a statement waits for a row lock before failing with 55P03
/// (the batch is then replayed).
const LOCK_TIMEOUT: &str = "5s";

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection settings for `url`: the store's schema first on the
/// search path, session time limits and `application_name`.
pub(super) fn config(url: &str, schema: &str, application: &str) -> Result<tokio_postgres::Config> {
    let mut config = tokio_postgres::Config::from_str(url).map_err(|e| Error::PostgresConfig {
        setting: "url",
        detail: format!("`{url}`: {e}"),
    })?;
    let session = format!(
        "-c search_path={schema} -c lock_timeout={LOCK_TIMEOUT} \
         -c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION}"
    );
    let options = match config.get_options() {
        Some(given) if !given.is_empty() => format!("{given} {session}"),
        _ => session,
    };
    config
        .options(options)
        .application_name(application)
        .connect_timeout(CONNECT_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30));
    Ok(config)
}

/// A pool of up to `size` connections with `config`.
pub(super) fn pool(config: tokio_postgres::Config, size: usize) -> Result<Pool> {
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| Error::postgres("setting up the connection pool", e))
}

/// A connection from `pool`.
pub(super) async fn get(pool: &Pool) -> Result<deadpool_postgres::Client> {
    pool.get().await.map_err(|e| match e {
        deadpool_postgres::PoolError::Backend(e) => Error::postgres("connecting", e),
        other => Error::postgres("getting a connection from the pool", other),
    })
}

/// A connection or an open transaction on one, whose statements are
/// prepared once per connection and reused.
#[derive(Clone, Copy)]
pub(super) struct Db<'a> {
    client: &'a tokio_postgres::Client,
    cache: &'a StatementCache,
}

impl<'a> Db<'a> {
    /// Statements outside a transaction.
    pub(super) fn client(client: &'a deadpool_postgres::Client) -> Self {
        Db {
            client,
            cache: &client.statement_cache,
        }
    }

    /// Statements inside the open transaction `tx`.
    pub(super) fn tx(tx: &'a deadpool_postgres::Transaction<'_>) -> Self {
        Db {
            client: tx.client(),
            cache: &tx.statement_cache,
        }
    }

    /// The rows `sql` returns.
    pub(super) async fn query(self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let statement = self.cache.prepare(self.client, sql).await?;
        Ok(self.client.query(&statement, params).await?)
    }

    /// The one row `sql` returns.
    pub(super) async fn one(self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row> {
        let statement = self.cache.prepare(self.client, sql).await?;
        Ok(self.client.query_one(&statement, params).await?)
    }

    /// Runs `sql`; how many rows it changed.
    pub(super) async fn execute(self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let statement = self.cache.prepare(self.client, sql).await?;
        Ok(self.client.execute(&statement, params).await?)
    }
}
