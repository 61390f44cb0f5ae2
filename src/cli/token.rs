//! `sse-gateway token`: mints an HS256 development token from the configured
//! secret (or `--secret`), so a newcomer can turn auth on and try it at once.
//! Not a production token issuer: real deployments sign tokens where users
//! log in.

use std::path::Path;

use anyhow::{bail, Context};
use sse_gateway::auth::{mint_hs256, Claims};
use sse_gateway::Config;

/// Arguments of `token`.
#[derive(clap::Args, Debug)]
pub struct TokenArgs {
    /// Topic or `prefix*` pattern the token may subscribe to (repeatable).
    #[arg(long, value_name = "PATTERN")]
    pub subscribe: Vec<String>,
    /// Topic or `prefix*` pattern the token may publish to (repeatable).
    #[arg(long, value_name = "PATTERN")]
    pub publish: Vec<String>,
    /// Tenant (`org` claim), for `[tenancy] enabled = true`.
    #[arg(long)]
    pub org: Option<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl: u64,
    /// Subject (`sub` claim), for your own bookkeeping.
    #[arg(long, default_value = "dev")]
    pub sub: String,
    /// HS256 secret; default: `auth.hs256_secret` of the config file (`--config`).
    #[arg(long, env = "SSE_GATEWAY_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
}

/// Prints the token on stdout. `config` is the global `--config`, if given.
pub fn run(args: TokenArgs, config: Option<&Path>) -> anyhow::Result<()> {
    let secret = match args.secret {
        Some(secret) => secret,
        None => {
            // An explicit --config must exist; the default ./config.toml may be absent.
            let path = config.unwrap_or(Path::new("config.toml"));
            let loaded = if config.is_some() || path.exists() {
                Config::from_file(path)?
            } else {
                Config::default()
            };
            let Some(auth) = loaded.auth else {
                bail!(
                    "{} has no [auth] table; add one with hs256_secret, or pass --secret",
                    path.display()
                );
            };
            match auth.hs256_secret {
                Some(secret) => secret,
                None => bail!(
                    "[auth] uses {}: mint tokens with your private key, not this command",
                    auth.algorithm()
                ),
            }
        }
    };
    if secret.len() < 32 {
        bail!("the HS256 secret must be at least 32 bytes");
    }
    if args.subscribe.is_empty() && args.publish.is_empty() {
        bail!(
            "this token would grant nothing: give --subscribe and/or --publish \
             (topics or prefix* patterns, repeatable)"
        );
    }
    for pattern in args.subscribe.iter().chain(&args.publish) {
        sse_gateway::model::TopicPattern::parse(pattern).map_err(|m| anyhow::anyhow!(m))?;
    }
    let exp = sse_gateway::auth::unix_now() + args.ttl;
    let claims = Claims {
        exp,
        subscribe: args.subscribe,
        publish: args.publish,
        org: args.org,
        sub: Some(args.sub),
    };
    let token = mint_hs256(&secret, &claims).context("cannot sign the token")?;
    println!("{token}");
    Ok(())
}
