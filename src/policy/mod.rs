//! Per-route policies, each a tower `Layer` + `Service`.
