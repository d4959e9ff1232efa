//! The alert webhook: each alert POSTed as JSON once it is durable.

use super::*;

/// Config `detect.webhook`: alerts are also POSTed (JSON, `{"seq": N, "record": {...}}`) to a
/// URL, once each is durable in the local log.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `https://...` (or `http://...`).
    pub url: String,
    /// CA certificates (PEM) for the endpoint's certificate; default: the Mozilla roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Time one delivery may take.
    #[serde(
        default = "default_webhook_timeout",
        with = "crate::clock::duration_text"
    )]
    pub timeout: Duration,
    /// Alerts waiting for delivery at most; beyond that they are dropped and counted.
    #[serde(default = "default_webhook_queue")]
    pub queue: usize,
}

fn default_webhook_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_webhook_queue() -> usize {
    1024
}

/// Deliveries tried per alert before it is given up (counted as dropped).
const WEBHOOK_ATTEMPTS: u32 = 3;

impl WebhookConfig {
    /// The URL as logs show it: scheme and host only, because paths and queries of webhooks
    /// often carry the secret that authorizes the caller.
    pub fn shown_url(&self) -> String {
        let (scheme, rest) = self.url.split_once("://").unwrap_or(("", &self.url));
        let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
        // Credentials before the host are secret too.
        let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
        format!("{scheme}://{host}/…")
    }

    pub fn check(&self) -> Result<(), SinkError> {
        let rest = self
            .url
            .strip_prefix("https://")
            .or_else(|| self.url.strip_prefix("http://"))
            .ok_or(SinkError::UrlScheme)?;
        if rest.is_empty() || rest.starts_with('/') {
            return Err(SinkError::UrlHost);
        }
        if self.url.starts_with("http://") && self.ca_file.is_some() {
            return Err(SinkError::CaNeedsHttps);
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(60) {
            return Err(SinkError::Timeout);
        }
        if self.queue == 0 || self.queue > 1 << 16 {
            return Err(SinkError::Queue {
                max: 1 << 16,
                what: "alerts",
            });
        }
        Ok(())
    }

    fn agent(&self) -> Result<ureq::Agent, SinkError> {
        use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
        // The daemon's one crypto provider (aws-lc-rs), as everywhere else.
        let mut tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ));
        if let Some(p) = &self.ca_file {
            let pem = std::fs::read(p).map_err(|source| SinkError::Read {
                path: p.clone(),
                source,
            })?;
            let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|i| match i {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<_, _>>()
                .map_err(|e| SinkError::Pem {
                    path: p.clone(),
                    message: e.to_string(),
                })?;
            if certs.is_empty() {
                return Err(SinkError::NoCertificate(p.clone()));
            }
            tls = tls.root_certs(RootCerts::Specific(Arc::new(certs)));
        }
        Ok(ureq::Agent::config_builder()
            .timeout_global(Some(self.timeout))
            .http_status_as_error(true)
            .max_redirects(0)
            .user_agent(concat!("agentwall/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls.build())
            .build()
            .into())
    }
}

/// Starts the alert webhook; a bad CA file is an error now.
pub fn webhook(cfg: &WebhookConfig) -> Result<Sink, SinkError> {
    cfg.check()?;
    let agent = cfg.agent()?;
    let url = cfg.url.clone();
    let shown = cfg.shown_url();
    let mut sink = Sink::spawn("webhook", cfg.queue, move |rx, stats| {
        for d in rx {
            let mut body = format!("{{\"seq\":{},\"record\":", d.seq).into_bytes();
            body.extend_from_slice(&d.record);
            body.push(b'}');
            let mut delay = Duration::from_millis(200);
            let mut delivered = false;
            for attempt in 1..=WEBHOOK_ATTEMPTS {
                match agent
                    .post(&url)
                    .header("Content-Type", "application/json")
                    .send(&body[..])
                {
                    Ok(_) => {
                        stats.connected.store(true, Ordering::Relaxed);
                        stats.sent.fetch_add(1, Ordering::Relaxed);
                        delivered = true;
                        break;
                    }
                    Err(e) => {
                        // An error may quote the URL (a bad URI does): never the whole of it.
                        stats.failed("POST", &e.to_string().replace(&url, &shown));
                        if attempt < WEBHOOK_ATTEMPTS {
                            thread::sleep(delay);
                            delay *= 4;
                        }
                    }
                }
            }
            if !delivered {
                tracing::warn!(url = %shown, seq = d.seq, "alert webhook: delivery given up (the alert is in the audit log)");
                stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    })?;
    sink.kinds = Some(&["alert"]);
    Ok(sink)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_settings_are_checked() {
        let w = |yaml: &str| {
            serde_norway::from_str::<WebhookConfig>(yaml)
                .unwrap()
                .check()
        };
        assert!(w("url: https://alerts.example/hook\n").is_ok());
        assert!(w("url: http://127.0.0.1:9/x\ntimeout: 2s\n").is_ok());
        assert!(
            w("url: ftp://x/\n")
                .unwrap_err()
                .to_string()
                .contains("https://")
        );
        assert!(
            w("url: https:///x\n")
                .unwrap_err()
                .to_string()
                .contains("host")
        );
        assert!(
            w("url: http://x/\nca_file: /ca.pem\n")
                .unwrap_err()
                .to_string()
                .contains("https")
        );
        assert!(
            w("url: https://x/\ntimeout: 5m\n")
                .unwrap_err()
                .to_string()
                .contains("timeout")
        );
        assert!(serde_norway::from_str::<WebhookConfig>("url: https://x/\nheaders: {}\n").is_err());
    }

    #[test]
    fn webhook_urls_are_logged_without_path_query_or_credentials() {
        let shown = |url: &str| {
            serde_norway::from_str::<WebhookConfig>(&format!("url: \"{url}\"\n"))
                .unwrap()
                .shown_url()
        };
        assert_eq!(
            shown("https://hooks.example/services/T0/B0/s3cret?token=x"),
            "https://hooks.example/…"
        );
        assert_eq!(
            shown("https://user:pw@h.example:8443/x"),
            "https://h.example:8443/…"
        );
        assert_eq!(shown("http://10.0.0.1?k=v"), "http://10.0.0.1/…");
    }
}
