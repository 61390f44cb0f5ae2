defmodule SseGateway.Config do
  @moduledoc """
  Settings: per-call options over `config :sse_gateway, ...` over defaults.

      config :sse_gateway,
        url: "http://127.0.0.1:8080",   # the gateway (a path prefix is kept)
        token: "eyJ...",                # or {Mod, :fun, args} / fn -> token end, called per request
        mode: :sync,                    # :sync | :async | :test
        timeout: 5_000,                 # ms for one HTTP request to answer
        connect_timeout: 2_000,
        retries: 2,                     # sync mode: transient failures retried, same key
        backoff_base: 100, backoff_max: 10_000,   # ms, exponential with full jitter
        buffer_size: 10_000,            # async: events held at most
        batch_size: 100,                # async: events per POST /publish/batch
        on_full: :block,                # async: :block (up to block_timeout) or :drop
        block_timeout: 5_000,
        drain_timeout: 5_000,           # async: flushing at shutdown
        reconnect_max: 10_000,          # streams: longest wait between reconnects
        idle_timeout: 45_000            # streams: reconnect after this much silence
  """

  @defaults [
    url: "http://127.0.0.1:8080",
    token: nil,
    mode: :sync,
    timeout: 5_000,
    connect_timeout: 2_000,
    retries: 2,
    backoff_base: 100,
    backoff_max: 10_000,
    buffer_size: 10_000,
    batch_size: 100,
    on_full: :block,
    block_timeout: 5_000,
    drain_timeout: 5_000,
    reconnect_max: 10_000,
    idle_timeout: 45_000
  ]

  @doc "The settings for one call: `opts` over the application env over defaults."
  @spec get(keyword()) :: map()
  def get(opts \\ []) do
    @defaults
    |> Keyword.merge(Application.get_all_env(:sse_gateway))
    |> Keyword.merge(opts)
    |> Map.new()
  end

  @doc "The bearer token for one request, or nil."
  @spec token(map()) :: String.t() | nil
  def token(%{token: nil}), do: nil
  def token(%{token: t}) when is_binary(t), do: t
  def token(%{token: f}) when is_function(f, 0), do: f.()
  def token(%{token: {m, f, a}}), do: apply(m, f, a)

  @doc "`base url` + `path`, keeping a path prefix of the base."
  @spec url(map(), String.t()) :: String.t()
  def url(%{url: base}, path), do: String.trim_trailing(base, "/") <> path

  @doc """
  TLS options for an `https` gateway: `ssl:` from the settings, else the
  system's CA store with peer and host name verification.
  """
  def ssl_opts(cfg, host) do
    Map.get(cfg, :ssl) ||
      [
        verify: :verify_peer,
        cacerts: :public_key.cacerts_get(),
        server_name_indication: host,
        customize_hostname_check: [match_fun: :public_key.pkix_verify_hostname_match_fun(:https)]
      ]
  end

  @doc "Exponential backoff with full jitter for attempt `n` (0-based), in ms."
  @spec backoff(map(), non_neg_integer()) :: non_neg_integer()
  def backoff(cfg, n) do
    cap = min(cfg.backoff_max, cfg.backoff_base * Integer.pow(2, min(n, 20)))
    # Never zero: half fixed, half random.
    div(cap, 2) + :rand.uniform(max(div(cap, 2), 1))
  end
end
