//! `imagegate batches list|show|cancel`: a tenant's batches in the configured store.

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BatchCommand {
    /// A tenant's batches, newest first.
    List {
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// One batch as JSON.
    Show {
        #[arg(long)]
        tenant: String,
        id: String,
    },
    /// Cancel a batch: lines not yet run are not run.
    Cancel {
        #[arg(long)]
        tenant: String,
        id: String,
    },
}

pub async fn run(db: imagegate::store::Database, command: BatchCommand) -> Result<(), String> {
    let store = imagegate::batch::BatchStore::new(db);
    let e = |e: imagegate::store::StoreError| e.to_string();
    match command {
        BatchCommand::List { tenant, limit } => {
            for b in store.batches(&tenant, None, limit).await.map_err(e)? {
                let c = b.request_counts;
                println!(
                    "{}  {:<11} {}/{} done, {} failed  created {}",
                    b.id, b.status, c.completed, c.total, c.failed, b.created_at
                );
            }
        }
        BatchCommand::Show { tenant, id } => {
            let b = store.batch(&tenant, &id).await.map_err(e)?;
            let b = b.ok_or_else(|| format!("no batch {id} for tenant {tenant}"))?;
            println!(
                "{}",
                serde_json::to_string_pretty(&b).map_err(|e| e.to_string())?
            );
        }
        BatchCommand::Cancel { tenant, id } => {
            let now = imagegate::clock::now_unix() as i64;
            let b = store.cancel(&tenant, &id, now).await.map_err(e)?;
            let b = b.ok_or_else(|| format!("no batch {id} for tenant {tenant}"))?;
            println!("{}: {}", b.id, b.status);
        }
    }
    Ok(())
}
