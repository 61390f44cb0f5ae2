defmodule SseGateway do
  @moduledoc """
  Client for sse-gateway: publish events (synchronously, or through a
  supervised buffer that batches and retries), subscribe processes to topics,
  mint tokens (`SseGateway.Token`). `SseGateway.Projects` is the
  PhoenixKitProjects.PubSub API over the gateway; `SseGateway.Test` serves an
  app's own tests without a gateway.

  Delivery mode (`config :sse_gateway, mode:` or the `:mode` option):

  - `:sync` — one request in the caller's process: `{:ok, id}` or
    `{:error, %SseGateway.Error{}}`; transient failures retried (`retries`)
    with the same `Idempotency-Key`.
  - `:async` — the event is validated and put in `SseGateway.Buffer` with its
    idempotency key: `:ok`, or `{:error, %SseGateway.Error{code:
    "buffer_full"}}` when it is full and `on_full: :drop` (or `:block` timed
    out). Sent in batches, retried until stored; never stored twice.
  - `:test` — nothing is sent: see `SseGateway.Test`.

  Invalid topics or event names are refused before anything is sent or
  buffered, with the code the gateway would use.
  """

  alias SseGateway.{Buffer, Config, Event, Stream, Sync}

  @doc """
  Publishes `data` (any JSON term) as event `event` (atom or string; `nil`
  is `message`) to `topics` (one name or a list).

  Options: `mode:`, `idempotency_key:` (default: a fresh random key; give
  your own to make a repeat of the same logical event a no-op), `buffer:`
  (async: the buffer's name), and any setting of `SseGateway.Config`.
  """
  @spec publish(String.t() | [String.t()], atom() | String.t() | nil, term(), keyword()) ::
          {:ok, String.t()} | :ok | {:error, SseGateway.Error.t()}
  def publish(topics, event, data, opts \\ []) do
    with {:ok, ev} <- Event.to_topics(topics, event, data, opts) do
      deliver(ev, opts)
    end
  end

  @doc """
  Publishes through the gateway's broadcast route `module/kind`
  (`POST /{module}/broadcast/{kind}`): the gateway computes the topics from
  `payload`. Same options and answers as `publish/4`.
  """
  @spec broadcast(String.t(), String.t(), atom() | String.t(), map(), keyword()) ::
          {:ok, String.t()} | :ok | {:error, SseGateway.Error.t()}
  def broadcast(module, kind, event, payload, opts \\ []) do
    with {:ok, ev} <- Event.to_route("#{module}/#{kind}", event, payload, opts) do
      deliver(ev, opts)
    end
  end

  @doc false
  def deliver(%Event{} = ev, opts) do
    cfg = Config.get(opts)

    case cfg.mode do
      :sync -> Sync.send(ev, cfg)
      :async -> Buffer.enqueue(Keyword.get(opts, :buffer, Buffer), ev)
      :test -> SseGateway.Test.capture(ev)
    end
  end

  @doc """
  Subscribes the calling process to `topics` (one name or a list of up to
  64; one stream for them all). It then receives
  `{:sse_gateway, :event, %SseGateway.Event{}}` (or, with `format: :projects`,
  `{:projects, event, payload}`) and `{:sse_gateway, :reset, info}`.

  Waits until the gateway has confirmed the stream (at most `timeout` ms),
  so everything published after this returns is delivered. Returns `:ok`
  (also when the gateway could not be reached in time: the stream keeps
  trying and starts from that point), or `{:error, %SseGateway.Error{}}` when
  the gateway refused the topics or token. Subscribing twice to the same
  topics is a no-op.

  Options: `format:`, `last_event_id:` (resume from a saved id; `"0"` for all
  retained history), `timeout:`, and `SseGateway.Config` settings (`url:`,
  `token:`, `idle_timeout:`, `reconnect_max:`).
  """
  @spec subscribe(String.t() | [String.t()], keyword()) :: :ok | {:error, SseGateway.Error.t()}
  def subscribe(topics, opts \\ []) do
    topics = topics |> List.wrap() |> Enum.uniq() |> Enum.sort()
    cfg = Config.get(opts)

    with :ok <- Event.check_topics(topics) do
      if cfg.mode == :test do
        SseGateway.Test.subscribe(topics, Keyword.get(opts, :format, :event))
      else
        start_stream(topics, cfg, opts)
      end
    end
  end

  defp start_stream(topics, cfg, opts) do
    spec =
      {Stream,
       subscriber: self(),
       topics: topics,
       cfg: cfg,
       format: Keyword.get(opts, :format, :event),
       last_event_id: Keyword.get(opts, :last_event_id)}

    case DynamicSupervisor.start_child(SseGateway.StreamSupervisor, spec) do
      {:ok, pid} ->
        await(pid, Keyword.get(opts, :timeout, cfg.connect_timeout + cfg.timeout))

      {:error, {:already_started, _}} ->
        :ok

      {:error, reason} ->
        {:error,
         %SseGateway.Error{code: "subscribe_failed", message: inspect(reason), reason: reason}}
    end
  end

  defp await(pid, timeout) do
    Stream.await(pid, timeout)
  catch
    :exit, {:timeout, _} ->
      require Logger
      Logger.warning("sse_gateway: stream not confirmed in #{timeout} ms; it keeps trying")
      :ok

    :exit, {reason, _} when reason in [:normal, :noproc] ->
      {:error, %SseGateway.Error{code: "subscribe_failed", message: "the stream stopped"}}
  end

  @doc "Ends the calling process's subscription to `topics` (as given to `subscribe/2`)."
  @spec unsubscribe(String.t() | [String.t()]) :: :ok
  def unsubscribe(topics) do
    topics = topics |> List.wrap() |> Enum.uniq() |> Enum.sort()
    SseGateway.Test.unsubscribe(topics)

    case Registry.lookup(SseGateway.Registry, {self(), topics}) do
      [{pid, _}] ->
        try do
          GenServer.stop(pid, :normal)
        catch
          :exit, _ -> :ok
        end

      [] ->
        :ok
    end

    :ok
  end

  @doc "Counters of the default buffer (see `SseGateway.Buffer.stats/1`)."
  defdelegate stats(), to: Buffer

  @doc "Waits until the default buffer has sent everything it holds (or `timeout`)."
  defdelegate flush(timeout \\ 5_000), to: Buffer
end
