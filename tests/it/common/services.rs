//! The services of the production-backend tests (`eval "$(scripts/services.sh)"`): their
//! settings from the environment, and a throw-away MongoDB database per test.

/// The value of `var`, or `None` with a note when it is not set, so that a developer without
/// the services still runs the rest. Under CI (`CI=true`) a missing service is a failure.
pub fn service_var(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => Some(value),
        _ => {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "{var} is not set; CI runs every test: eval \"$(scripts/services.sh)\""
            );
            eprintln!("note: {var} is not set; skipping (eval \"$(scripts/services.sh)\")");
            None
        }
    }
}

/// A database of its own for one test, dropped when the value is dropped (also when the test
/// fails).
pub struct TestDatabase {
    pub uri: String,
    pub name: String,
}

impl TestDatabase {
    /// `None` when `WORKERS_TEST_MONGO_URI` is not set (and not under CI).
    pub fn new() -> Option<TestDatabase> {
        let uri = service_var("WORKERS_TEST_MONGO_URI")?;
        let name = format!("workers_test_{}", uuid::Uuid::new_v4().simple());
        Some(TestDatabase { uri, name })
    }

    /// A client of its own, on the calling runtime.
    pub async fn client(&self) -> mongodb::Client {
        mongodb::Client::with_uri_str(&self.uri).await.unwrap()
    }

    pub async fn db(&self) -> mongodb::Database {
        self.client().await.database(&self.name)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which cannot block on another future; a
        // thread with a runtime and a client of its own can.
        let (uri, name) = (self.uri.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let client = mongodb::Client::with_uri_str(&uri).await?;
                client.database(&name).drop().await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("note: could not drop the test database {}", self.name);
        }
    }
}
