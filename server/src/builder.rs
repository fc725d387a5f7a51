//! [`Server::builder`]: the server as a library. The builder fills a
//! [`ServerConfig`] and hands it to [`crate::start`], the very path
//! `hearth serve` takes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use hearth_engine::validate::{Context, MutationView, Refuse};
use hearth_engine::Schema;

use crate::{Asset, Running, ServerConfig, StartError, Validator};

/// The sync server as a library: `Server::builder()...start().await`.
pub struct Server;

impl Server {
    /// A builder with no schema (required), the data directory
    /// `hearth-data`, the address `127.0.0.1:8787`, no static assets, no
    /// validators, and [`ServerConfig::new`]'s limits.
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            schema: None,
            data_dir: PathBuf::from("hearth-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8787)),
            assets: &[],
            validators: Vec::new(),
            tweaks: Vec::new(),
        }
    }
}

type Tweak = Box<dyn FnOnce(&mut ServerConfig) + Send>;

/// Settings for a server; [`ServerBuilder::start`] starts it.
pub struct ServerBuilder {
    schema: Option<Schema>,
    data_dir: PathBuf,
    listen: SocketAddr,
    assets: &'static [Asset],
    validators: Vec<Validator>,
    tweaks: Vec<Tweak>,
}

impl ServerBuilder {
    /// The app's schema (required): `Schema::parse(toml)`.
    pub fn schema(mut self, schema: Schema) -> Self {
        self.schema = Some(schema);
        self
    }

    /// The directory of the store (`hearth.db` in it), created if missing.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = dir.into();
        self
    }

    /// The address to listen on; port 0 takes a free port
    /// ([`Running::addr`] says which).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Static files served at their paths (`hearth::assets::ASSETS` is the
    /// demo app and the browser library); none by default.
    pub fn assets(mut self, assets: &'static [Asset]) -> Self {
        self.assets = assets;
        self
    }

    /// Serves the app's static files from `dir` at `/` (Hearth's own
    /// assets stay served beside them); `start` refuses a missing directory.
    pub fn app_dir(self, dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        self.configure(move |config| config.app_dir = Some(dir))
    }

    /// Adds a server rule: `rule(ctx, mutation)` runs on every mutation a
    /// device pushes, after the rules added before it, inside the merge
    /// transaction, once the mutation merged and passed the schema's write
    /// rules. `ctx` reads the store with the mutation's effects
    /// ([`Context::query`]) and says who wrote ([`Context::client_id`],
    /// [`Context::user`] under `[auth]`); `mutation` lists its row changes.
    ///
    /// `Err(Refuse::new(code, reason))` refuses the mutation: it is rolled
    /// back on the server and on its device, which gets `Rejected` with
    /// that code (1 to 32 of `A-Z0-9_`) and reason (cut to 1024 bytes).
    /// An error passed up with `?`, a panic or an invalid code refuses it
    /// with `VALIDATOR_FAILED` (the detail goes to the server's log). Other
    /// mutations are not affected. The rule runs on the store's one writer
    /// thread: keep it to a few indexed queries.
    pub fn validate<F>(mut self, rule: F) -> Self
    where
        F: Fn(&Context<'_>, &MutationView<'_>) -> Result<(), Refuse> + Send + Sync + 'static,
    {
        self.validators.push(Arc::new(rule));
        self
    }

    /// Changes any other setting (limits, timeouts, log retention) on the
    /// [`ServerConfig`] the builder made, before it starts.
    pub fn configure(mut self, tweak: impl FnOnce(&mut ServerConfig) + Send + 'static) -> Self {
        self.tweaks.push(Box::new(tweak));
        self
    }

    /// The [`ServerConfig`] these settings make.
    pub fn config(self) -> Result<(ServerConfig, &'static [Asset]), StartError> {
        let schema = self.schema.ok_or(StartError::Missing(
            "a schema: call .schema(Schema::parse(toml)?)",
        ))?;
        let mut config = ServerConfig::new(self.listen, self.data_dir, schema);
        config.validators.0.extend(self.validators);
        for tweak in self.tweaks {
            tweak(&mut config);
        }
        Ok((config, self.assets))
    }

    /// Opens the store and starts serving ([`crate::start`]); returns once
    /// the socket is bound. Errors: [`StartError::Missing`] without a
    /// schema, and every error of [`crate::start`].
    pub async fn start(self) -> Result<Running, StartError> {
        let (config, assets) = self.config()?;
        crate::start(config, assets).await
    }
}
