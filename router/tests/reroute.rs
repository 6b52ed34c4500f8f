//! A request routed before its body was read, to a deployment a swap has taken out of the table
//! since, is routed again to what replaced it (the drain, which saw none of its requests
//! inside, may have closed it meanwhile: the request was answered 503 "shutting down").

use std::sync::Arc;

use sluice_deployments::{DataType, Deployment, DeploymentSpec, ModelMetadata, Servable, TensorSpec};
use sluice_router::{ModelRoute, RouteTable, Router, VersionChoice};

fn deployment() -> Arc<Deployment> {
    let mut spec = DeploymentSpec::new("m");
    spec.version = "1".into();
    spec.num_replicas = 0;
    let tensor = TensorSpec { name: "x".into(), dtype: DataType::Int64, shape: vec![-1, 1] };
    let meta = ModelMetadata {
        platform: "onnxruntime_onnx".into(),
        inputs: vec![tensor.clone()],
        outputs: vec![TensorSpec { name: "y".into(), ..tensor }],
    };
    Arc::new(Deployment::start_remote(spec, meta).unwrap())
}

fn table(d: &Arc<Deployment>) -> RouteTable {
    let route = ModelRoute {
        versions: [("1".to_string(), Servable::Deployment(d.clone()))].into(),
        ..Default::default()
    };
    RouteTable { models: [("m".to_string(), route)].into(), ..Default::default() }
}

#[tokio::test]
async fn a_request_routed_before_a_swap_is_routed_again_to_what_replaced_it() {
    let (old, new) = (deployment(), deployment());
    let router = Router::new(table(&old));
    let any = VersionChoice::default();
    let routed = router.route("m", any).unwrap();
    assert!(router.rerouted(&routed, "m", any).is_none(), "still serving: kept");

    router.publish(table(&new));
    old.mark_retired();
    let again = router.rerouted(&routed, "m", any).expect("routed again");
    assert!(Arc::ptr_eq(again.deployment().unwrap(), &new));
    let exact = VersionChoice { exact: Some("1"), pinned: None };
    assert!(Arc::ptr_eq(router.rerouted(&routed, "m", exact).unwrap().deployment().unwrap(), &new));

    // Nothing serves the model any more (deleted): the request keeps what it was routed to,
    // for that one's answer.
    router.publish(RouteTable::default());
    assert!(router.rerouted(&routed, "m", any).is_none());
}
