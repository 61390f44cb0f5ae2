defmodule SseGateway.TestSupport.FaultProxy do
  @moduledoc """
  A TCP proxy in front of the gateway that injects faults, for the tests.

  Modes (`set_mode/2`):
  - `:pass` — relays both ways.
  - `:refuse` — closes every new connection at once (the gateway looks down).
  - `{:faults, drop: p, delay: q, delay_ms: ms}` — for each piece of an
    answer coming back from the gateway (so the request did reach it and was
    acted on): with probability `p` closes both connections instead of
    relaying it, with probability `q` holds it `ms` before relaying (past the
    client's timeout), else relays it.

  - `:blackhole` — a connection that gets an answer piece in this mode
    stays open but never relays anything from the gateway again (a
    half-dead network path: only silence tells). New connections in `:pass`
    mode work.

  `cut/1` closes every open connection (a dropped stream). `stats/1` counts
  the faults injected.
  """

  use GenServer

  def start_link(upstream_port), do: GenServer.start_link(__MODULE__, upstream_port)

  def child_spec(upstream_port) do
    %{id: {__MODULE__, make_ref()}, start: {__MODULE__, :start_link, [upstream_port]}}
  end

  def port(proxy), do: GenServer.call(proxy, :port)
  def url(proxy), do: "http://127.0.0.1:#{port(proxy)}"
  def set_mode(proxy, mode), do: GenServer.call(proxy, {:mode, mode})
  def cut(proxy), do: GenServer.call(proxy, :cut)
  def stats(proxy), do: GenServer.call(proxy, :stats)

  @impl true
  def init(upstream) do
    {:ok, listen} =
      :gen_tcp.listen(0, [
        :binary,
        active: false,
        reuseaddr: true,
        ip: {127, 0, 0, 1},
        backlog: 512
      ])

    {:ok, port} = :inet.port(listen)
    table = :ets.new(:fault_proxy, [:public, :set])
    :ets.insert(table, [{:mode, :pass}, {:dropped, 0}, {:delayed, 0}, {:conns, 0}])
    me = self()
    acceptor = spawn_link(fn -> accept(listen, upstream, table, me) end)
    {:ok, %{listen: listen, port: port, table: table, acceptor: acceptor, conns: MapSet.new()}}
  end

  @impl true
  def handle_call(:port, _, s), do: {:reply, s.port, s}

  def handle_call({:mode, mode}, _, s) do
    :ets.insert(s.table, {:mode, mode})
    {:reply, :ok, s}
  end

  def handle_call(:cut, _, s) do
    Enum.each(s.conns, &send(&1, :cut))
    {:reply, :ok, s}
  end

  def handle_call(:stats, _, s) do
    [{_, d}] = :ets.lookup(s.table, :dropped)
    [{_, l}] = :ets.lookup(s.table, :delayed)
    [{_, c}] = :ets.lookup(s.table, :conns)
    {:reply, %{dropped: d, delayed: l, connections: c}, s}
  end

  @impl true
  def handle_info({:conn, pid}, s) do
    Process.monitor(pid)
    {:noreply, %{s | conns: MapSet.put(s.conns, pid)}}
  end

  def handle_info({:DOWN, _, :process, pid, _}, s),
    do: {:noreply, %{s | conns: MapSet.delete(s.conns, pid)}}

  def handle_info(_, s), do: {:noreply, s}

  defp accept(listen, upstream, table, owner) do
    case :gen_tcp.accept(listen) do
      {:ok, client} ->
        pid = spawn(fn -> conn(client, upstream, table) end)
        :ok = :gen_tcp.controlling_process(client, pid)
        send(owner, {:conn, pid})
        send(pid, :go)
        accept(listen, upstream, table, owner)

      {:error, _} ->
        :ok
    end
  end

  defp conn(client, upstream, table) do
    receive do
      :go -> :ok
    end

    :ets.update_counter(table, :conns, 1)

    with mode when mode != :refuse <- mode(table),
         {:ok, server} <-
           :gen_tcp.connect({127, 0, 0, 1}, upstream, [:binary, active: false], 2_000) do
      me = self()
      up = spawn_link(fn -> pump(client, server, me) end)
      down = spawn_link(fn -> pump_faulty(server, client, table, me) end)

      receive do
        _ -> :ok
      end

      Process.unlink(up)
      Process.unlink(down)
      Process.exit(up, :kill)
      Process.exit(down, :kill)
      :gen_tcp.close(server)
    end

    :gen_tcp.close(client)
  end

  defp mode(table) do
    [{_, mode}] = :ets.lookup(table, :mode)
    mode
  end

  defp pump(from, to, owner) do
    with {:ok, data} <- :gen_tcp.recv(from, 0),
         :ok <- :gen_tcp.send(to, data) do
      pump(from, to, owner)
    else
      _ -> send(owner, :done)
    end
  end

  defp pump_faulty(from, to, table, owner) do
    case :gen_tcp.recv(from, 0) do
      {:ok, data} ->
        case fate(mode(table)) do
          :pass ->
            if :gen_tcp.send(to, data) == :ok,
              do: pump_faulty(from, to, table, owner),
              else: send(owner, :done)

          :drop ->
            :ets.update_counter(table, :dropped, 1)
            send(owner, :done)

          :swallow ->
            # Like TCP over a dead path: once bytes are lost, this connection
            # never delivers again (it is not closed either).
            swallow(from, owner)

          {:delay, ms} ->
            :ets.update_counter(table, :delayed, 1)
            Process.sleep(ms)

            if :gen_tcp.send(to, data) == :ok,
              do: pump_faulty(from, to, table, owner),
              else: send(owner, :done)
        end

      {:error, _} ->
        send(owner, :done)
    end
  end

  defp swallow(from, owner) do
    case :gen_tcp.recv(from, 0) do
      {:ok, _} -> swallow(from, owner)
      {:error, _} -> send(owner, :done)
    end
  end

  defp fate({:faults, opts}) do
    r = :rand.uniform()
    drop = Keyword.get(opts, :drop, 0.0)
    delay = Keyword.get(opts, :delay, 0.0)

    cond do
      r < drop -> :drop
      r < drop + delay -> {:delay, Keyword.get(opts, :delay_ms, 1_000)}
      true -> :pass
    end
  end

  defp fate(:blackhole), do: :swallow
  defp fate(_), do: :pass
end
