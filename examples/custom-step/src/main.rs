//! Serves the example's config with the custom step registered:
//! `cargo run -p sluice-example-custom-step`, then
//! `curl -s localhost:8000/weather -d '{"celsius": [0, 100]}'` → `{"fahrenheit": [[32.0], [212.0]]}`.

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    sluice_example_custom_step::register();
    sluice_server::runtime::init(None, None)?;
    let config =
        sluice_config::parse(sluice_example_custom_step::CONFIG, std::path::Path::new("custom-step.yaml"))?;
    let server = sluice_server::start(config, Default::default()).await?;
    println!("listening on http://{}", server.http_addr());
    server
        .run_until(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    Ok(())
}
