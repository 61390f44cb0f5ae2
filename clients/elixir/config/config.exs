import Config

# Defaults for this project's own builds; an app sets these in its own config.
config :sse_gateway,
  url: "http://127.0.0.1:8080",
  mode: :sync

if config_env() == :test do
  # The tests start their own gateways and buffers; keep the app's quiet.
  config :logger, level: :warning
end
