defmodule SseGateway.Buffer do
  @moduledoc """
  Asynchronous delivery: a supervised, bounded buffer that sends events in
  batches through `POST /publish/batch` and retries until they are stored,
  without ever storing one twice.

  - **Idempotency.** Every event gets its idempotency key when it is created
    (`SseGateway.Event`), before it enters the buffer; every attempt sends the
    same key (`"idempotency_key"` of its batch item, or the `Idempotency-Key`
    header when sent alone), so a batch that timed out, lost its connection
    or got `503` after the gateway stored it is answered from the gateway's
    memory of the key, not stored again.
  - **Order.** One batch is in flight at a time and a failed batch is retried
    as it was, before anything behind it.
  - **Retries.** A transient failure (no answer, timeout, `429`, `502`–`504`)
    waits for `Retry-After` when given, else a backoff doubling from
    `backoff_base` to `backoff_max` with full jitter, and retries without
    limit: a gateway that is down for a while gets everything once it is back.
  - **Refusals.** A batch refused as a whole (`400`/`422` for one item, `404`
    from a gateway without the batch route, `413`, `401`/`403`) is sent again
    one event at a time, so one bad event costs only itself: each event the
    gateway refuses is logged (`Logger.error`) and counted as `rejected`.
    Events are validated before they are buffered, so this is rare.
  - **Bound.** At most `buffer_size` events are held (queued and in flight).
    When full, `on_full: :drop` refuses the new event at once, `:block` makes
    the caller wait up to `block_timeout` for room, then refuses it. Every
    refused event is counted as `dropped` and logged (`Logger.warning`, at
    most once a second, with the count).
  - **Shutdown.** On a normal stop the buffer tries to send what it holds for
    up to `drain_timeout`; what is left is logged as lost.

  `stats/1` reads the counters without calling the process.
  """

  use GenServer
  require Logger

  alias SseGateway.{Config, Error, Event, HTTP, JSON, Sync}

  @counters [:enqueued, :sent, :dropped, :rejected, :retries, :buffered]

  # ------------------------------------------------------------------ API

  @doc """
  Starts a buffer. Options: `name:` (default `SseGateway.Buffer`) and any
  `SseGateway.Config` setting, over the application's config.
  """
  def start_link(opts) do
    name = Keyword.get(opts, :name, __MODULE__)
    GenServer.start_link(__MODULE__, Keyword.put(opts, :name, name), name: name)
  end

  @doc false
  def child_spec(opts) do
    %{
      id: Keyword.get(opts, :name, __MODULE__),
      start: {__MODULE__, :start_link, [opts]},
      shutdown: 30_000
    }
  end

  @doc """
  Puts `event` in the buffer: `:ok`, or `{:error, %SseGateway.Error{code:
  "buffer_full"}}` when it was dropped (see `on_full`).
  """
  @spec enqueue(GenServer.server(), Event.t()) :: :ok | {:error, Error.t()}
  def enqueue(buffer \\ __MODULE__, %Event{} = event) do
    # Encoded here, in the caller: the work is spread over callers, data
    # JSON cannot hold is refused at once, and the batch is built by joining.
    item = event |> Event.batch_item() |> JSON.encode!()
    GenServer.call(buffer, {:enqueue, event, item}, :infinity)
  rescue
    e in [ArgumentError, Protocol.UndefinedError] ->
      {:error, %Error{code: "invalid_json", message: Exception.message(e)}}
  catch
    :exit, reason ->
      {:error,
       %Error{code: "buffer_unavailable", message: "the buffer is not running", reason: reason}}
  end

  @doc """
  Counters since the buffer started: `enqueued`, `sent` (stored by the
  gateway), `dropped` (refused: buffer full), `rejected` (refused by the
  gateway), `retries` (failed attempts), and `buffered` (held now).
  """
  @spec stats(GenServer.name()) :: %{atom() => non_neg_integer()}
  def stats(name \\ __MODULE__) do
    ref = :persistent_term.get({__MODULE__, name})

    @counters
    |> Enum.with_index(1)
    |> Map.new(fn {k, i} -> {k, :counters.get(ref, i)} end)
  end

  @doc "Waits until everything buffered so far has been sent or rejected: `:ok` or `{:error, :timeout}`."
  def flush(name \\ __MODULE__, timeout) do
    GenServer.call(name, :flush, timeout)
  catch
    :exit, {:timeout, _} -> {:error, :timeout}
  end

  # ------------------------------------------------------------ callbacks

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)
    name = Keyword.fetch!(opts, :name)
    cfg = Config.get(opts)
    counters = :counters.new(length(@counters), [:write_concurrency])
    :persistent_term.put({__MODULE__, name}, counters)

    {:ok,
     %{
       name: name,
       opts: Keyword.drop(opts, [:name]),
       size: cfg.buffer_size,
       batch_size: cfg.batch_size,
       on_full: cfg.on_full,
       block_timeout: cfg.block_timeout,
       drain_timeout: cfg.drain_timeout,
       queue: :queue.new(),
       held: 0,
       blocked: :queue.new(),
       inflight: nil,
       attempt: 0,
       timer: nil,
       flushers: [],
       counters: counters,
       drop_log: {nil, 0}
     }}
  end

  @impl true
  def handle_call({:enqueue, ev, item}, from, s) do
    cond do
      s.held < s.size ->
        s = push(s, {ev, item})
        {:reply, :ok, send_next(s)}

      s.on_full == :block ->
        ref = make_ref()
        timer = Process.send_after(self(), {:unblock, ref}, s.block_timeout)
        {:noreply, %{s | blocked: :queue.in({ref, timer, from, {ev, item}}, s.blocked)}}

      true ->
        {:reply, {:error, full_error(s)}, dropped(s, ev)}
    end
  end

  def handle_call(:flush, from, s) do
    if s.held == 0 and :queue.is_empty(s.blocked),
      do: {:reply, :ok, s},
      else: {:noreply, %{s | flushers: [from | s.flushers]}}
  end

  @impl true
  def handle_info({ref, result}, %{inflight: %{ref: ref}} = s) do
    Process.demonitor(ref, [:flush])
    {:noreply, s |> finished(result) |> send_next()}
  end

  def handle_info({:DOWN, ref, :process, _, reason}, %{inflight: %{ref: ref}} = s) do
    err = %Error{code: "crashed", message: "the sending task crashed: #{inspect(reason)}"}
    {:noreply, s |> finished({:retry, err, s.inflight.events, 0, 0}) |> send_next()}
  end

  def handle_info(:retry, s), do: {:noreply, send_next(%{s | timer: nil})}

  def handle_info({:unblock, ref}, s) do
    {gone, kept} =
      s.blocked |> :queue.to_list() |> Enum.split_with(fn {r, _, _, _} -> r == ref end)

    s =
      Enum.reduce(gone, %{s | blocked: :queue.from_list(kept)}, fn {_, _, from, {ev, _}}, s ->
        GenServer.reply(from, {:error, full_error(s)})
        dropped(s, ev)
      end)

    {:noreply, reply_flushers(s)}
  end

  def handle_info(_other, s), do: {:noreply, s}

  @impl true
  def terminate(_reason, s), do: drain(s)

  # ------------------------------------------------------------- internals

  defp push(s, entry) do
    count(s, :enqueued)
    held = s.held + 1
    :counters.put(s.counters, 6, held)
    %{s | queue: :queue.in(entry, s.queue), held: held}
  end

  defp full_error(s),
    do: %Error{
      code: "buffer_full",
      message: "the buffer holds #{s.size} events; this one was dropped"
    }

  defp dropped(s, ev) do
    count(s, :dropped)
    {last, n} = s.drop_log
    now = System.monotonic_time(:millisecond)

    if last == nil or now - last >= 1_000 do
      Logger.warning(
        "sse_gateway: buffer full (#{s.size} events): dropped event #{ev.event} to #{inspect(ev.topics || ev.route)}" <>
          if(n > 0, do: " and #{n} more since the last message", else: "")
      )

      %{s | drop_log: {now, 0}}
    else
      %{s | drop_log: {last, n + 1}}
    end
  end

  defp count(s, name) do
    :counters.add(s.counters, Enum.find_index(@counters, &(&1 == name)) + 1, 1)
  end

  defp count(s, name, n) do
    :counters.add(s.counters, Enum.find_index(@counters, &(&1 == name)) + 1, n)
  end

  defp send_next(%{inflight: nil, timer: nil} = s) do
    case take(s.queue, s.batch_size, []) do
      {[], _} ->
        s

      {events, queue} ->
        cfg = Config.get(s.opts)

        task =
          Task.Supervisor.async_nolink(SseGateway.TaskSupervisor, fn -> deliver(events, cfg) end)

        %{s | queue: queue, inflight: %{ref: task.ref, events: events, attempt: s.attempt}}
    end
  end

  defp send_next(s), do: s

  # Up to n entries, and at most ~512 KiB of JSON (the gateway's default body
  # limit is 1 MiB); always at least one.
  defp take(queue, n, acc, bytes \\ 0)
  defp take(queue, 0, acc, _), do: {Enum.reverse(acc), queue}

  defp take(queue, n, acc, bytes) do
    case :queue.peek(queue) do
      {:value, {_, item} = entry} when acc == [] or bytes + byte_size(item) <= 524_288 ->
        take(:queue.drop(queue), n - 1, [entry | acc], bytes + byte_size(item))

      _ ->
        {Enum.reverse(acc), queue}
    end
  end

  defp finished(s, {:done, stored, rejected}) do
    count(s, :sent, stored)
    count(s, :rejected, length(rejected))
    n = stored + length(rejected)
    s = %{s | inflight: nil, held: s.held - n, attempt: 0}
    :counters.put(s.counters, 6, s.held)
    s |> admit() |> reply_flushers()
  end

  defp finished(s, {:retry, err, unsent, stored, rejected}) do
    # What the attempt did store (or the gateway refused) is done; the rest
    # goes back to the front of the queue, in order, and is retried as it was.
    attempt = s.inflight.attempt
    count(s, :sent, stored)
    count(s, :rejected, rejected)
    count(s, :retries)
    s = %{s | held: s.held - stored - rejected}
    :counters.put(s.counters, 6, s.held)

    if attempt == 0 do
      Logger.warning(
        "sse_gateway: sending #{length(unsent)} events failed (#{Exception.message(err)}); retrying with the same keys"
      )
    end

    delay = Sync.wait(err, Config.get(s.opts), attempt)
    timer = Process.send_after(self(), :retry, delay)
    queue = Enum.reduce(Enum.reverse(unsent), s.queue, &:queue.in_r/2)
    admit(%{s | inflight: nil, timer: timer, queue: queue, attempt: attempt + 1})
  end

  # Moves blocked callers into the queue while there is room.
  defp admit(s) do
    case :queue.out(s.blocked) do
      {{:value, {_ref, timer, from, entry}}, rest} when s.held < s.size ->
        Process.cancel_timer(timer)
        GenServer.reply(from, :ok)
        admit(push(%{s | blocked: rest}, entry))

      _ ->
        s
    end
  end

  defp reply_flushers(%{flushers: []} = s), do: s

  defp reply_flushers(s) do
    if s.held == 0 and :queue.is_empty(s.blocked) do
      Enum.each(s.flushers, &GenServer.reply(&1, :ok))
      %{s | flushers: []}
    else
      s
    end
  end

  # ------------------------------------------------------------ delivery
  # Runs in a task: returns {:done, stored, rejected} or
  # {:retry, err, unsent, stored, rejected_count}.

  @doc false
  def deliver(entries, cfg) do
    body = ["{\"events\":[", entries |> Enum.map(&elem(&1, 1)) |> Enum.intersperse(?,), "]}"]

    case HTTP.request(:post, "/publish/batch", IO.iodata_to_binary(body), [], cfg) do
      {:ok, _, %{"ids" => ids}, _} when length(ids) == length(entries) ->
        {:done, length(entries), []}

      {:ok, status, _, _} ->
        err = %Error{
          status: status,
          code: "invalid_response",
          message: "the batch answer has no ids"
        }

        {:retry, err, entries, 0, 0}

      {:error, err} ->
        if Error.transient?(err),
          do: {:retry, err, entries, 0, 0},
          else: one_by_one(entries, cfg, 0, [])
    end
  end

  defp one_by_one([], _cfg, stored, rejected), do: {:done, stored, rejected}

  defp one_by_one([{ev, _} = entry | rest] = all, cfg, stored, rejected) do
    {path, body} = Event.request(ev)

    case HTTP.post_json(path, body, [{"idempotency-key", ev.key}], cfg) do
      {:ok, _, _, _} ->
        one_by_one(rest, cfg, stored + 1, rejected)

      {:error, err} ->
        if Error.transient?(err) do
          {:retry, err, all, stored, length(rejected)}
        else
          Logger.error(
            "sse_gateway: the gateway refused event #{ev.event} to #{inspect(ev.topics || ev.route)}: #{Exception.message(err)}; dropped"
          )

          one_by_one(rest, cfg, stored, [entry | rejected])
        end
    end
  end

  # At shutdown: what is held, sent with a bounded wait.
  defp drain(s) do
    deadline = System.monotonic_time(:millisecond) + s.drain_timeout

    queue =
      case s.inflight do
        nil ->
          s.queue

        %{ref: ref, events: events} ->
          receive do
            {^ref, {:done, _, _}} ->
              s.queue

            {^ref, {:retry, _, unsent, _, _}} ->
              Enum.reduce(Enum.reverse(unsent), s.queue, &:queue.in_r/2)
          after
            max(deadline - System.monotonic_time(:millisecond), 0) ->
              Enum.reduce(Enum.reverse(events), s.queue, &:queue.in_r/2)
          end
      end

    blocked =
      s.blocked
      |> :queue.to_list()
      |> Enum.map(fn {_, _, from, entry} ->
        GenServer.reply(from, :ok)
        entry
      end)

    left = drain_loop(:queue.to_list(queue) ++ blocked, Config.get(s.opts), deadline, 0)

    if left > 0 do
      Logger.error("sse_gateway: stopping with #{left} events not sent; they are lost")
    end

    :ok
  end

  defp drain_loop([], _cfg, _deadline, _n), do: 0

  defp drain_loop(entries, cfg, deadline, n) do
    remaining = deadline - System.monotonic_time(:millisecond)

    if remaining <= 0 do
      length(entries)
    else
      {batch, rest} = Enum.split(entries, 100)
      cfg = %{cfg | timeout: min(cfg.timeout, remaining)}

      case deliver(batch, cfg) do
        {:done, _, _} ->
          drain_loop(rest, cfg, deadline, 0)

        {:retry, _err, unsent, _, _} ->
          Process.sleep(
            min(Config.backoff(cfg, n), max(deadline - System.monotonic_time(:millisecond), 0))
          )

          drain_loop(unsent ++ rest, cfg, deadline, n + 1)
      end
    end
  end
end
