//! Connections: the pool, the session settings every connection starts
//! with, and running statements prepared once per connection.

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::task::Poll;
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

/// One statement of a [`Db::pipeline`]: its SQL and its parameters.
pub(super) type Statement<'a> = (&'a str, &'a [&'a (dyn ToSql + Sync)]);

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

    /// Runs `statements` in one round trip and returns the rows of each
    /// (none for a statement that returns none). All are sent before any
    /// answer is awaited, in order, and the server runs them in that order,
    /// each after the one before has finished: a statement may rely on the
    /// locks and writes of those before it. The first statement to fail, in
    /// order, is the error (in a transaction, the ones after it fail too).
    pub(super) async fn pipeline(self, statements: &[Statement<'_>]) -> Result<Vec<Vec<Row>>> {
        // Prepared first (only a statement new to this connection costs a
        // round trip), so that each query is sent the moment it is first
        // polled, and they are first polled in order.
        let prepared = in_order(
            statements
                .iter()
                .map(|(sql, _)| self.cache.prepare(self.client, sql)),
        )
        .await?;
        let queries = prepared
            .iter()
            .zip(statements)
            .map(|(statement, (_, params))| self.client.query(statement, params));
        Ok(in_order(queries).await?)
    }
}

/// Drives `futures` together, polling them in order, and returns their
/// outputs in order; the first to fail, in order, ends it with its error.
async fn in_order<T, E, F>(futures: impl IntoIterator<Item = F>) -> std::result::Result<Vec<T>, E>
where
    F: Future<Output = std::result::Result<T, E>>,
{
    let mut running: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut done: Vec<Option<T>> = running.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut waiting = false;
        for (future, output) in running.iter_mut().zip(done.iter_mut()) {
            if output.is_some() {
                continue;
            }
            match future.as_mut().poll(cx) {
                Poll::Ready(Ok(value)) => *output = Some(value),
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => waiting = true,
            }
        }
        if waiting {
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    })
    .await?;
    Ok(done.into_iter().flatten().collect())
}
